"""Record formats: instruction (alpaca), chat (`messages` with role/content), plain text — detected and validated.

A record is a dict. Its format is decided by its fields, in this order of precedence:

* ``messages`` → **chat**: a list of ``{"role": "system"|"user"|"assistant", "content": str}``; an optional system
  message first, then user and assistant turns alternating, ending with an assistant turn.
* ``instruction`` / ``output`` → **instruction**: ``instruction`` and ``output`` strings, optional ``input``
  (string or null) and optional ``system`` string.
* ``text`` → **text**: one string, trained on entirely.

Other fields are allowed and ignored (e.g. an ``id``). Anything else is a `ConfigError` that names where the record
came from (file and line, or the record's index) and which field is wrong.
"""

from __future__ import annotations

from typing import Any

from llmtune.core.errors import ConfigError

FORMATS = ("instruction", "chat", "text")
ROLES = ("system", "user", "assistant")


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


def _check_messages(messages: Any, where: str) -> None:
    """Validate a chat record's `messages`: roles, types, order, and at least one assistant turn to learn."""
    if not isinstance(messages, list):
        raise _fail(where, "messages", f"must be a list of {{role, content}} objects, got {_type_name(messages)}")
    if not messages:
        raise _fail(where, "messages", "is empty")
    expected = "user"
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _fail(where, field, f"must be an object with 'role' and 'content', got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise _fail(where, f"{field}.{key}", "missing")
        role, content = message["role"], message["content"]
        if not isinstance(role, str):
            raise _fail(where, f"{field}.role", f"must be a string, got {_type_name(role)}")
        if role not in ROLES:
            raise _fail(where, f"{field}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise _fail(where, f"{field}.content", f"must be a string, got {_type_name(content)}")
        if role == "system":
            if i != 0:
                raise _fail(where, f"{field}.role", "a system message may only come first")
            continue
        if role != expected:
            raise _fail(where, f"{field}.role", f"expected a {expected!r} turn here (user and assistant alternate)")
        if not content.strip():
            raise _fail(where, f"{field}.content", "is empty")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise _fail(where, f"messages[{len(messages) - 1}].role",
                    "the last message must be an assistant turn (there is nothing to learn after it)")


def detect_format(record: Any, where: str = "record") -> str:
    """The format of one record ("instruction", "chat" or "text"), after validating its fields."""
    if not isinstance(record, dict):
        raise _fail(where, None, f"a record must be an object, got {_type_name(record)}")
    if "messages" in record:
        _check_messages(record["messages"], where)
        return "chat"
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
    raise _fail(where, None, "no 'messages', 'instruction'/'output' or 'text' field: cannot tell the format "
                f"(fields present: {fields})")


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The chat turns of an instruction or chat record (an instruction is a user turn; input follows it)."""
    kind = detect_format(record)
    if kind == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if kind == "text":
        raise ConfigError("a text record has no chat turns")
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
