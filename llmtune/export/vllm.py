"""What vLLM will refuse when it loads an adapter, found before the adapter reaches the server.

vLLM serves LoRA adapters only (``--enable-lora``; ``vllm/lora/peft_helper.py`` and ``vllm/config/lora.py``):

* ``use_dora`` -> "vLLM does not yet support DoRA";
* ``modules_to_save`` -> "vLLM only supports modules_to_save being None";
* a rank above ``--max-lora-rank`` (default 16; allowed values 1, 8, 16, 32, 64, 128, 256, 320, 512) is
  rejected, so a rank above 512 cannot be served at all, and one above 16 needs the flag;
* other PEFT types (prompt tuning, prefix tuning, IA3, ...) and non-PEFT bottleneck adapters are not LoRA;
* LoRA on ``lm_head`` / the embeddings needs vLLM's extra-vocabulary support, deprecated and being removed;
* adapter biases (``bias != "none"``) are not loaded by current vLLM.

`check_vllm` reads only ``adapter_config.json`` (and the weight names, when present): no torch, no vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError

#: ``--max-lora-rank`` values vLLM accepts (vllm/config/lora.py, MaxLoRARanks) and its default.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
_EMBEDDING_NAMES = ("lm_head", "embed_tokens", "wte", "word_embeddings", "embed_in", "embed_out", "output")


@dataclasses.dataclass(frozen=True)
class VllmFinding:
    """One thing vLLM does with this adapter: ``refused`` (it will not load) or ``flag`` (it needs a setting)."""

    kind: str        #: "dora", "modules_to_save", "peft_type", "bottleneck", "embedding", "rank", "bias"
    severity: str    #: "refused" or "flag"
    message: str     #: what vLLM does
    fix: str         #: what to do instead

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.message} -> {self.fix}"


def _targets(config: dict[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        return [targets]
    return [str(t) for t in targets]


def _touches_embeddings(names: list[str]) -> list[str]:
    return [n for n in names if n.split(".")[-1] in _EMBEDDING_NAMES or any(e in n for e in ("lm_head", "embed_tokens"))]


def _weight_names(adapter_dir: Path) -> list[str]:
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return []
    from llmtune.models.loading import safetensors_names

    return safetensors_names(path)


def _lora_findings(config: dict[str, Any], weights: list[str]) -> list[VllmFinding]:
    out: list[VllmFinding] = []
    if config.get("use_dora"):
        out.append(VllmFinding("dora", "refused", "vLLM does not support DoRA adapters",
                               "merge it (llmtune export --format hf) and serve the merged model, or retrain with "
                               "method='lora'"))
    if config.get("modules_to_save"):
        out.append(VllmFinding("modules_to_save", "refused",
                               f"vLLM only loads adapters without modules_to_save (has {config['modules_to_save']})",
                               "merge it (llmtune export --format hf), or retrain without modules_to_save"))
    lora_weights = [w.rsplit(".lora_", 1)[0] for w in weights if ".lora_" in w]  # modules_to_save copies excluded
    embedded = _touches_embeddings(_targets(config)) or _touches_embeddings(lora_weights)
    if embedded:
        out.append(VllmFinding("embedding", "refused",
                               f"LoRA on {', '.join(sorted(set(embedded)))}: vLLM's extra-vocabulary LoRA support is "
                               "deprecated and removed in current versions",
                               "merge it (llmtune export --format hf), or retrain with targets that exclude lm_head "
                               "and the embeddings (targets='all-linear' does)"))
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        out.append(VllmFinding("rank", "refused", f"rank {rank} is above vLLM's largest --max-lora-rank "
                               f"({VLLM_MAX_LORA_RANKS[-1]})", "merge it (llmtune export --format hf), or retrain "
                               f"with rank <= {VLLM_MAX_LORA_RANKS[-1]}"))
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        need = next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
        out.append(VllmFinding("rank", "flag", f"rank {rank} is above vLLM's default --max-lora-rank "
                               f"({VLLM_DEFAULT_MAX_LORA_RANK})", f"start vLLM with --max-lora-rank {need}"))
    if config.get("bias") not in (None, "none"):
        out.append(VllmFinding("bias", "refused", f"adapter biases (bias={config['bias']!r}) are not loaded by vLLM",
                               "merge it (llmtune export --format hf), or retrain with bias='none'"))
    return out


#: Files of llmtune's bottleneck adapters (``llmtune.trainers.methods.bottleneck``), which are not PEFT adapters.
BOTTLENECK_CONFIG = "bottleneck_config.json"


def _adapter_path(path: Path) -> Path:
    for name in ("adapter_config.json", BOTTLENECK_CONFIG):
        if not (path / name).is_file() and (path / "adapter" / name).is_file():
            return path / "adapter"
    return path


def _read(cfg_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object")
    return config


def check_vllm(adapter_dir: str | Path) -> list[VllmFinding]:
    """Everything vLLM will refuse (or need a flag for) in the adapter at ``adapter_dir`` (a run or adapter dir)."""
    path = _adapter_path(Path(adapter_dir))
    if (path / BOTTLENECK_CONFIG).is_file():
        method = _read(path / BOTTLENECK_CONFIG).get("method", "bottleneck")
        return [VllmFinding("bottleneck", "refused", f"{method} adapters (bottleneck layers added after attention/MLP) "
                            "are not LoRA; vLLM serves LoRA adapters only and they cannot be merged into the weights",
                            "serve the model with llmtune/transformers, or retrain with method='lora'")]
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{path}: no adapter_config.json; give an adapter directory or a run directory")
    config = _read(cfg_path)
    kind = config.get("peft_type")
    if kind != "LORA":
        what = f"a {kind} adapter" if kind else f"{cfg_path} names no peft_type; it"
        return [VllmFinding("peft_type", "refused", f"{what} is not LoRA; vLLM serves LoRA adapters only",
                            "retrain with method='lora' (soft prompts and other PEFT types cannot be merged either)")]
    return _lora_findings(config, _weight_names(path))
