"""Using what the trainer wrote: load base + adapter, generate answers, merge the adapter into the base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError
from llmtune.core.manifest import verify_manifest


def adapter_base(adapter: str | Path) -> str | None:
    """The base model an adapter was trained on, as recorded in its ``adapter_config.json`` (or None)."""
    from llmtune.trainers.methods.bottleneck import CONFIG_FILE, is_bottleneck_dir

    path = Path(adapter) / "adapter_config.json"
    if is_bottleneck_dir(adapter):
        path = Path(adapter) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{adapter} is not an adapter directory (no adapter_config.json or {CONFIG_FILE})")
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    return str(base) if base else None


def load_for_inference(model: str | None = None, adapter: str | Path | None = None, *,
                       dtype: Any = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the base (``model`` or the adapter's recorded base) with the adapter applied.

    The tokenizer comes from the adapter directory when the trainer saved one there, else from the base.
    """
    from transformers import AutoTokenizer

    from llmtune.models.loading import load_model_and_tokenizer

    if model is None:
        if adapter is None:
            raise ConfigError("give a model, an adapter, or both")
        model = adapter_base(adapter)
        if model is None:
            raise ConfigError(f"adapter {adapter} does not record its base model; pass --model")
    base, tokenizer = load_model_and_tokenizer(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        from llmtune.trainers.methods.bottleneck import is_bottleneck_dir, load_bottleneck

        adapter = Path(adapter)
        verify_manifest(adapter, required=False)  # an adapter llmtune saved carries checksums; damage is named
        if (adapter / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        if is_bottleneck_dir(adapter):
            base = load_bottleneck(base, adapter)
        else:
            import warnings

            with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                        category=FutureWarning)
                base = PeftModel.from_pretrained(base, str(adapter))
    if tokenizer is None:
        raise ConfigError(f"no tokenizer found with {model} or {adapter}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base.eval()
    return base, tokenizer


def generate_text(model: Any, tokenizer: Any, prompts: list[str], *, template: str | None = "llama3",
                  max_new_tokens: int = 64, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None) -> list[str]:
    """Answers to ``prompts``, each wrapped as a user instruction in ``template`` (None: raw text): greedy
    (``temperature`` 0) or sampled with ``temperature``/``top_p``/``top_k``, repeatable with ``seed``."""
    from llmtune.trainers._evaluate import sampling_options

    sampling = sampling_options(temperature, top_p, top_k, seed)
    from llmtune.trainers._evaluate import generate

    ids = []
    for prompt in prompts:
        if template is None:
            text = prompt
        else:
            from llmtune.data import render_prompt

            # the prompt part does not depend on the answer; a placeholder satisfies the record checks
            text, _answer = render_prompt({"instruction": prompt, "input": "", "output": "x"}, template, tokenizer)
        ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, sampling=sampling)


def merge_adapter(adapter: str | Path, out: str | Path, *, model: str | None = None, dtype: str = "auto",
                  trust_remote_code: bool = False) -> Path:
    """Fold a LoRA/DoRA or IA3 adapter into its (unquantized) base and write the merged model as safetensors.

    A bottleneck adapter raises `MergeNotSupportedError` (its non-linearity cannot be folded into a weight).
    """
    import torch

    from llmtune.trainers.methods.bottleneck import is_bottleneck_dir, merge_bottleneck

    if is_bottleneck_dir(adapter):
        merge_bottleneck()  # raises MergeNotSupportedError, saying why

    torch_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"dtype={dtype!r} is not one of auto, fp32, bf16, fp16")
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text()) \
        if (Path(adapter) / "adapter_config.json").is_file() else {}
    if cfg.get("peft_type") not in (None, "LORA", "IA3"):
        raise ConfigError(f"adapter {adapter} is a {cfg.get('peft_type')} adapter; only LoRA/DoRA and IA3 adapters "
                          "can be merged into the base weights")
    from llmtune.core.atomic import atomic_dir
    from llmtune.core.lock import lock_output
    from llmtune.core.manifest import write_manifest
    from llmtune.core.paths import check_output_dir

    base = model if model is not None else (cfg.get("base_model_name_or_path") or None)
    out = check_output_dir(out, [adapter, base])
    with lock_output(out):  # one writer per output; written atomically, the manifest last
        peft_model, tokenizer = load_for_inference(model, adapter, dtype=torch_dtype,
                                                   trust_remote_code=trust_remote_code)
        merged = peft_model.merge_and_unload()
        with atomic_dir(out, keep_others=True) as tmp:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            write_manifest(tmp)
    return out
