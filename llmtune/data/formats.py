"""Record formats: instruction (alpaca), chat (`messages` with role/content), plain text — detected and validated.

A record is a dict. Its format is decided by its fields, in this order of precedence:

* ``messages`` → **chat**: a list of ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``; an optional
  system message first, then user and assistant turns alternating, ending with an assistant turn. An assistant
  turn may call tools (``tool_calls``: a list of ``{"type": "function", "function": {"name", "arguments"}}`` or
  the short ``{"name", "arguments"}``; arguments an object or its JSON text; its content may then be empty); the
  ``tool`` turns that follow carry the results (content a string, object or list), then an assistant answers.
  Optional record fields: ``system`` (a system prompt, when the messages have none) and ``tools`` (the
  function schemas offered, a list of objects).
* ``conversations`` → **sharegpt**: a list of ``{"from": ..., "value": ...}`` with ``from`` one of
  human/user, gpt/assistant/model, system, tool/observation/function_response, function_call (the value is
  a ``{"name", "arguments"}`` JSON object: an assistant tool call); optional ``system`` and ``tools`` fields.
* ``instruction`` / ``output`` → **instruction**: ``instruction`` and ``output`` strings, optional ``input``
  (string or null) and optional ``system`` string.
* ``text`` → **text**: one string, trained on entirely.

Other fields are allowed and ignored (e.g. an ``id``). Anything else is a `ConfigError` that names where the record
came from (file and line, or the record's index) and which field is wrong.
"""

from __future__ import annotations

import json
from typing import Any

from llmtune.core.errors import ConfigError

FORMATS = ("instruction", "chat", "sharegpt", "text")
ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT speaker names -> chat roles ("function_call" becomes an assistant turn with a tool call)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
                  "observation": "tool", "function_response": "tool", "function_call": "assistant"}


def _fail(where: str, field: str | None, message: str) -> ConfigError:
    """A ConfigError that says where and which field."""
    return ConfigError(f"{where}: field {field!r}: {message}" if field else f"{where}: {message}")


def _type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for messages."""
    return "null" if value is None else type(value).__name__


def _require_str(record: dict[str, Any], field: str, where: str, *, optional: bool = False) -> None:
    """Check that `record[field]` is a non-empty string (or absent/null/empty when optional)."""
    if field not in record:
        if optional:
            return
        raise _fail(where, field, "missing")
    value = record[field]
    if optional and (value is None or value == ""):
        return
    if not isinstance(value, str):
        raise _fail(where, field, f"must be a string, got {_type_name(value)}")
    if not value.strip():
        raise _fail(where, field, "is empty")


def _tool_call(call: Any, where: str, field: str) -> dict[str, Any]:
    """One tool call, normalised to ``{"type": "function", "function": {"name": str, "arguments": dict}}``."""
    if not isinstance(call, dict):
        raise _fail(where, field, f"must be an object with 'name' and 'arguments', got {_type_name(call)}")
    fn = call["function"] if "function" in call else call
    inner = f"{field}.function" if "function" in call else field
    if not isinstance(fn, dict):
        raise _fail(where, inner, f"must be an object, got {_type_name(fn)}")
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(where, f"{inner}.name", "missing" if name is None else "must be a non-empty string")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise _fail(where, f"{inner}.arguments", f"invalid JSON: {err.msg}") from None
    if not isinstance(args, dict):
        raise _fail(where, f"{inner}.arguments", f"must be an object (or its JSON text), got {_type_name(args)}")
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _role(message: Any, where: str, field: str, keys: tuple[str, str]) -> tuple[str, dict[str, str]]:
    """The message's role (checked) and the role names of its format (ShareGPT's ``from`` or ``role``)."""
    role_key, content_key = keys
    if not isinstance(message, dict):
        raise _fail(where, field, f"must be an object with {role_key!r} and {content_key!r}, "
                    f"got {_type_name(message)}")
    if role_key not in message:
        raise _fail(where, f"{field}.{role_key}", "missing")
    role = message[role_key]
    if not isinstance(role, str):
        raise _fail(where, f"{field}.{role_key}", f"must be a string, got {_type_name(role)}")
    names = SHAREGPT_ROLES if role_key == "from" else {r: r for r in ROLES}
    if role not in names:
        raise _fail(where, f"{field}.{role_key}", f"unknown role {role!r} (expected one of {', '.join(names)})")
    return role, names


def _message(message: Any, where: str, field: str, keys: tuple[str, str]) -> dict[str, Any]:
    """One message, checked and normalised (``role``, ``content``; ``tool_calls``, ``name``, ``tool_call_id``)."""
    content_key = keys[1]
    role, names = _role(message, where, field, keys)
    calls = message.get("tool_calls")
    if content_key not in message and not calls:
        raise _fail(where, f"{field}.{content_key}", "missing")
    content = message.get(content_key, "")
    out: dict[str, Any] = {"role": names[role]}
    if role == "function_call":  # ShareGPT: the value is the call itself
        try:
            parsed = json.loads(content) if isinstance(content, str) else content
        except json.JSONDecodeError as err:
            raise _fail(where, f"{field}.{content_key}", f"a function_call must be JSON: {err.msg}") from None
        calls, content = [parsed], ""
    if names[role] == "tool":
        if not isinstance(content, (str, dict, list)):
            raise _fail(where, f"{field}.{content_key}", f"must be a string, object or list, got {_type_name(content)}")
    elif not isinstance(content, str):
        raise _fail(where, f"{field}.{content_key}", f"must be a string, got {_type_name(content)}")
    out["content"] = content
    if calls is not None:
        if out["role"] != "assistant":
            raise _fail(where, f"{field}.tool_calls", "only an assistant turn can call tools")
        if not isinstance(calls, list) or not calls:
            raise _fail(where, f"{field}.tool_calls", "must be a non-empty list of calls")
        out["tool_calls"] = [_tool_call(c, where, f"{field}.tool_calls[{j}]") for j, c in enumerate(calls)]
    for extra in ("name", "tool_call_id"):
        if isinstance(message.get(extra), str):
            out[extra] = message[extra]
    return out


def _check_order(messages: list[dict[str, Any]], where: str, label: str, role_key: str, content_key: str) -> None:
    """Roles in a trainable order: [system] user assistant (tool+ assistant)* (user assistant ...)*."""
    expected: tuple[str, ...] = ("user",)
    for i, message in enumerate(messages):
        role, field = message["role"], f"{label}[{i}]"
        if role == "system":
            if i != 0:
                raise _fail(where, f"{field}.{role_key}", "a system message may only come first")
            continue
        if role not in expected:
            want = " or ".join(repr(e) for e in expected)
            raise _fail(where, f"{field}.{role_key}", f"expected a {want} turn here (user and assistant alternate"
                        f"{'; tool results follow a tool call' if 'tool' in expected or role == 'tool' else ''})")
        content = message["content"]
        if isinstance(content, str) and not content.strip() and not message.get("tool_calls"):
            raise _fail(where, f"{field}.{content_key}", "is empty")
        if role == "user":
            expected = ("assistant",)
        elif role == "tool":
            expected = ("tool", "assistant")
        else:
            expected = ("tool",) if message.get("tool_calls") else ("user",)
    last = messages[-1]
    if last["role"] != "assistant":
        raise _fail(where, f"{label}[{len(messages) - 1}].{role_key}",
                    "the last message must be an assistant turn (there is nothing to learn after it)")


def _turns(record: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The normalised chat turns of a chat or ShareGPT record (with its ``system`` field folded in)."""
    sharegpt = "messages" not in record
    label, keys = ("conversations", ("from", "value")) if sharegpt else ("messages", ("role", "content"))
    raw = record[label]
    if not isinstance(raw, list):
        raise _fail(where, label, f"must be a list of {{{keys[0]}, {keys[1]}}} objects, got {_type_name(raw)}")
    if not raw:
        raise _fail(where, label, "is empty")
    messages = [_message(m, where, f"{label}[{i}]", keys) for i, m in enumerate(raw)]
    _check_order(messages, where, label, *keys)
    system = record.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise _fail(where, "system", f"must be a string, got {_type_name(system)}")
        if messages[0]["role"] == "system":
            raise _fail(where, "system", f"a system prompt is given twice (also as {label}[0])")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def record_tools(record: dict[str, Any], where: str = "record") -> list[dict[str, Any]] | None:
    """The record's ``tools`` (function schemas offered to the model), validated; None when absent."""
    tools = record.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise _fail(where, "tools", f"invalid JSON: {err.msg}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _fail(where, "tools", f"must be a list of objects (function schemas), got {_type_name(tools)}")
    return tools


def detect_format(record: Any, where: str = "record") -> str:
    """The format of one record ("instruction", "chat", "sharegpt" or "text"), after validating its fields."""
    if not isinstance(record, dict):
        raise _fail(where, None, f"a record must be an object, got {_type_name(record)}")
    if "messages" in record or "conversations" in record:
        _turns(record, where)
        record_tools(record, where)
        return "chat" if "messages" in record else "sharegpt"
    if "instruction" in record or "output" in record:
        _require_str(record, "instruction", where)
        _require_str(record, "output", where)
        _require_str(record, "input", where, optional=True)
        _require_str(record, "system", where, optional=True)
        return "instruction"
    if "text" in record:
        _require_str(record, "text", where)
        return "text"
    fields = ", ".join(repr(k) for k in record) or "none"
    raise _fail(where, None, "no 'messages', 'conversations', 'instruction'/'output' or 'text' field: cannot tell "
                f"the format (fields present: {fields})")


def to_messages(record: dict[str, Any], where: str = "record") -> list[dict[str, Any]]:
    """The chat turns of an instruction, chat or ShareGPT record (an instruction is a user turn; input follows).

    Turns are ``{"role", "content"}`` plus, where present, ``tool_calls`` (normalised to the OpenAI form with
    arguments as an object), ``name`` and ``tool_call_id``.
    """
    kind = detect_format(record, where)
    if kind in ("chat", "sharegpt"):
        return _turns(record, where)
    if kind == "text":
        raise ConfigError(f"{where}: a text record has no chat turns")
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
