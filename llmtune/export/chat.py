"""The training chat template in the forms servers read: Jinja (GGUF, transformers) and an Ollama Modelfile.

llmtune's templates (`llmtune.data.templates`) are Python; a server needs the same text from its own template
language. The Jinja templates below render, for every conversation, exactly the prompt `render_prompt` builds
(the tests compare them through transformers' ``apply_chat_template``); the Ollama TEMPLATE is the same text in
Go-template syntax over ``.Messages``.
"""

from __future__ import annotations

from typing import Any

from llmtune.core.errors import InvalidOptionError
from llmtune.data.templates import ALPACA_PROMPT_NO_INPUT, llama31_chat_template

_ALPACA_PREAMBLE = ALPACA_PROMPT_NO_INPUT[:ALPACA_PROMPT_NO_INPUT.index("\n\n")]

#: Jinja chat templates equal to llmtune's llama3 / chatml / alpaca / llama3.1 renderers.
JINJA = {
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '\n<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% set messages = messages[1:] %}{% else %}{{ '" + _ALPACA_PREAMBLE + "' }}{% endif %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '\n\n### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    # the Llama 3.1 tokenizer's own template, which llmtune's llama3.1 renderer reproduces byte for byte
    "llama3.1": llama31_chat_template(),
}

#: The token that ends an answer under each template (None: the tokenizer's eos).
END_OF_ANSWER = {"llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>", "chatml": "<|im_end|>", "alpaca": None}


def jinja_template(template: str | None, tokenizer: Any) -> str | None:
    """The Jinja chat template for ``template`` ("tokenizer": the tokenizer's own; None: the tokenizer's, if any)."""
    if template in (None, "tokenizer"):
        own = getattr(tokenizer, "chat_template", None)
        return own if isinstance(own, str) else None
    if template not in JINJA:
        raise InvalidOptionError(f"template={template!r} is not one of llama3, llama3.1, chatml, alpaca, tokenizer")
    return JINJA[template]


def stop_tokens(template: str | None, tokenizer: Any) -> list[str]:
    """Tokens that end an answer: the template's end-of-answer token and the eos token."""
    stops = []
    own = END_OF_ANSWER.get(template or "")
    if own and own in tokenizer.get_vocab():
        stops.append(own)
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def _go_string(text: str) -> str:
    """Literal text inside a Go template (``{{`` would start an action)."""
    return text.replace("{{", "{{ \"{{\" }}")


def ollama_template(template: str, tokenizer: Any, *, bos_in_template: bool = True) -> str:
    """The Modelfile TEMPLATE (Go template over ``.Messages``) rendering what llmtune's ``template`` renders.

    ``bos_in_template``: write the BOS text into the template (when the GGUF does not add one itself).
    Ollama templates cannot trim, so llama3 message contents are used as given (llmtune trims them).
    """
    bos = (tokenizer.bos_token or "") if bos_in_template else ""
    eos = tokenizer.eos_token or ""
    if template == "llama3":
        return ("<|begin_of_text|>" if bos_in_template else "") + (
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
            "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n")
    if template == "chatml":
        return ("{{- range $i, $m := .Messages }}{{ if $i }}\n{{ end }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}"
                "<|im_end|>{{- end }}\n<|im_start|>assistant\n")
    if template == "alpaca":
        return (_go_string(bos) + "{{- if .System }}{{ .System }}{{ else }}" + _ALPACA_PREAMBLE + "{{ end }}"
                "{{- range .Messages }}{{ if eq .Role \"user\" }}\n\n### Instruction:\n{{ .Content }}\n\n"
                "### Response:\n{{ else if eq .Role \"assistant\" }}{{ .Content }}" + _go_string(eos) + "{{ end }}"
                "{{- end }}")
    raise InvalidOptionError(f"no Ollama template for template={template!r} (llama3, chatml or alpaca); "
                             "give template= the one the run trained with")


def modelfile(gguf_name: str, template: str, tokenizer: Any, *, bos_in_template: bool = True,
              system: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF, the TEMPLATE, a stop PARAMETER per end-of-answer token."""
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{ollama_template(template, tokenizer, bos_in_template=bos_in_template)}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in stop_tokens(template, tokenizer):
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
