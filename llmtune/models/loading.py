"""Load a causal LM and its tokenizer from a local directory or a hub id, failing fast and clearly when offline.

* A local directory is read with ``local_files_only=True`` (never touches the network).
* A hub id is read from the local cache only when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set or the hub
  does not answer a quick connection probe; a miss is then an `LlmtuneError` that says what to do, not a hang.
* ``trust_remote_code`` is off unless asked for; a model that needs it is an error that says so.
* A ``.gguf`` file (or a directory holding exactly one and no ``config.json``) is read with transformers' GGUF
  loader, dequantized into the compute dtype (float32 unless asked), with the tokenizer and chat template it carries;
  `import_gguf` writes it out as an ordinary model directory. Every command takes models through this module.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llmtune.core.errors import (
    ConfigError,
    InvalidOptionError,
    LlmtuneError,
    MissingDependencyError,
    UnsupportedModelError,
)
from llmtune.core.manifest import verify_manifest

DTYPES = ("auto", "float32", "float16", "bfloat16")
#: what sits on the backbone: a language-model head, or a scalar score head (a reward model)
HEADS = ("lm", "score")
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the environment asks for no hub access (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (HF_ENDPOINT, default huggingface.co:443) opens in time."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a filesystem path rather than a hub id ("org/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_dtype(dtype: Any) -> Any:
    """A torch dtype (or "auto" / None) from a dtype or its name."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return getattr(torch, dtype)
    raise InvalidOptionError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)} or a torch.dtype")


def _source(name_or_path: str | Path) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether to stay offline) for a model directory or a hub id."""
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{local}: not a model directory (no config.json)")
        verify_manifest(local, required=False)  # llmtune-written models carry checksums; damage is named
        return str(local), True
    if local.exists():
        raise ConfigError(f"{name}: is a file, not a model directory")
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise ConfigError(f"{name}: no such model directory")
    local_only = hub_offline()
    if not local_only and not hub_reachable():
        local_only = True  # try the cache; the caller's error says the hub was unreachable
    return name, local_only


def load_model_and_tokenizer(
    name_or_path: str | Path,
    *,
    dtype: Any = None,
    quantization_config: Any = None,
    trust_remote_code: bool = False,
    device_map: Any = None,
    head: str = "lm",
    fresh_head: bool = False,
    head_hint: str = "",
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local directory or a hub id; a tokenizer without a pad token gets eos as pad.

    `quantization_config` is passed to ``from_pretrained`` as is (e.g. a Quantizer's ``hf_quantization_config()``).
    ``head``: ``"lm"`` (a causal LM) or ``"score"`` (a 1-label ``XForSequenceClassification``: a reward model).
    A ``"score"`` model whose checkpoint lacks the head's weights (a causal LM; transformers would initialise them
    at random) is refused with `ConfigError` (``head_hint`` says what to do) unless ``fresh_head``.
    Raises `ConfigError` for a missing local directory and `LlmtuneError` when a hub id cannot be fetched.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if head not in HEADS:
        raise InvalidOptionError(f"head={head!r} is not one of {', '.join(HEADS)}")
    if not isinstance(trust_remote_code, bool):
        raise InvalidOptionError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
    torch_dtype = resolve_dtype(dtype)
    gguf = gguf_path(name_or_path)
    if gguf is not None:
        if quantization_config is not None:
            raise ConfigError(f"{gguf}: a GGUF model cannot be quantized while loading; load it, then quantize the "
                              "module (or import it first: llmtune import-gguf)")
        if head != "lm":
            raise ConfigError(f"{gguf}: a GGUF file holds a causal LM, not a {head!r} model; import it first "
                              f"(llmtune import-gguf FILE --out DIR) and give DIR{f' ({head_hint})' if head_hint else ''}")
        return load_gguf(gguf, dtype=torch_dtype)
    name = str(name_or_path)
    local = Path(name).expanduser()
    source, local_only = _source(name_or_path)
    where = "the local directory" if local.is_dir() else (
        "the local cache (offline: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)" if hub_offline()
        else "the local cache (the hub is unreachable)" if local_only else "the Hugging Face hub")

    kwargs: dict[str, Any] = {"local_files_only": local_only, "trust_remote_code": trust_remote_code}
    given = {"dtype": torch_dtype, "quantization_config": quantization_config, "device_map": device_map}
    model_kwargs = {**kwargs, **{k: v for k, v in given.items() if v is not None}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if local.is_dir() and quantization_config is None and _gptq_checkpoint(local):
            # a GPTQ-layout directory (llmtune quantize wrote it, or another tool): our own loader, so neither
            # optimum nor gptqmodel is needed to run it
            from llmtune.quantizers.gptq import load_quantized

            model = load_quantized(local, dtype=torch_dtype if torch_dtype != "auto" else None)
        elif head == "score":
            model = _load_score_model(source, model_kwargs, name, fresh_head, head_hint)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except LlmtuneError:
        raise
    except (OSError, ValueError) as err:
        text = str(err)
        if "trust_remote_code" in text and not trust_remote_code:
            raise LlmtuneError(f"{name} contains custom code; it is not run unless you pass trust_remote_code=True "
                               "(read the code first)") from err
        hint = ("download it on a machine with access (or unset HF_HUB_OFFLINE), or pass a local directory"
                if local_only and not local.is_dir() else "check the name, the revision and your access rights")
        raise LlmtuneError(f"cannot load model {name!r} from {where}: {text.splitlines()[0] if text else err!r}. "
                           f"{hint.capitalize()}.") from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if head == "score" and model.config.pad_token_id is None:  # the head reads the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    _guard_4bit(model)
    model.eval()
    return model, tokenizer


def _load_score_model(source: str, model_kwargs: dict[str, Any], name: str, fresh_head: bool, hint: str) -> Any:
    """A 1-label sequence-classification model; refused when its head would be initialised at random."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(source, **{k: model_kwargs[k] for k in ("local_files_only", "trust_remote_code")})
    saved = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
    what = ", ".join(config.architectures or [config.model_type])
    hint = f"; {hint}" if hint else ""
    if config.architectures and not saved and not fresh_head:  # refused before its weights load
        raise ConfigError(f"{name}: a {what} has no score head (transformers would initialise one at random){hint}")
    kwargs = dict(model_kwargs) if saved else {**model_kwargs, "num_labels": 1}
    model, info = AutoModelForSequenceClassification.from_pretrained(source, output_loading_info=True, **kwargs)
    if model.config.num_labels != 1:
        raise ConfigError(f"{name}: {what} with {model.config.num_labels} labels; a reward model has one output "
                          "(a scalar score)")
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(f"{model.base_model_prefix}."))
    if missing and not fresh_head:
        raise ConfigError(f"{name}: {what} has no trained score head ({', '.join(missing)} not in its weights: "
                          f"transformers would initialise it at random){hint}")
    return model


def safetensors_names(path: str | Path) -> list[str]:
    """The tensor names in a ``.safetensors`` file, read from its header (no torch, no tensor data)."""
    import json

    with open(path, "rb") as fh:  # the header: an 8-byte little-endian length, then JSON
        size = int.from_bytes(fh.read(8), "little")
        try:
            header = json.loads(fh.read(size))
        except (ValueError, MemoryError) as exc:
            raise ConfigError(f"{path}: not a safetensors file (unreadable header: {exc})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return [k for k in header if k != "__metadata__"]


def _gptq_checkpoint(directory: Path) -> bool:
    """Whether ``directory/config.json`` declares a GPTQ ``quantization_config``."""
    import json

    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # transformers' own loader reports it
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qcfg, dict) and qcfg.get("quant_method") == "gptq"


def _guard_4bit(model: Any) -> None:
    """A model with bitsandbytes 4-bit layers (load-time QLoRA or a saved nf4/fp4 model) gets the kernel check."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    if str(getattr(method, "value", method)) != "bitsandbytes":
        return
    from llmtune.quantizers.bnb_guard import guard_4bit_model

    guard_4bit_model(model)


GGUF_EXTRA = "pip install 'llmtune[gguf]'"


def gguf_path(name_or_path: Any) -> Path | None:
    """The GGUF file ``name_or_path`` names: a ``.gguf`` file, or a directory holding exactly one ``.gguf`` file and
    no ``config.json`` (a directory with a config.json is an ordinary model directory). None when it names neither."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return None
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ConfigError(f"{path}: holds {len(found)} .gguf files ({', '.join(f.name for f in found)}); "
                          "name the file to load")
    return found[0] if found else None


def _gguf_reader(path: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MissingDependencyError(f"{path}: reading a GGUF model needs the gguf package ({GGUF_EXTRA})") from None
    try:
        return GGUFReader(str(path))
    except (ValueError, KeyError, OSError) as err:
        raise UnsupportedModelError(f"{path}: not a readable GGUF file ({' '.join(str(err).split())[:200]})") from None


def check_gguf(path: Path) -> str:
    """The file's GGUF architecture, after checking transformers can read it and every tensor type it holds;
    `UnsupportedModelError` naming the architecture or the tensor type (and tensor) otherwise."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    reader = _gguf_reader(path)
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UnsupportedModelError(f"{path}: no general.architecture in the GGUF metadata; not a model file")
    arch = str(bytes(field.parts[field.data[0]]), encoding="utf-8")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} cannot be read by transformers' GGUF loader "
                                    f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
    for tensor in reader.tensors:
        if tensor.tensor_type not in plain and tensor.tensor_type not in _type_traits:
            raise UnsupportedModelError(f"{path}: tensor {tensor.name} has GGUF type {tensor.tensor_type.name}, which "
                                        "the gguf package cannot dequantize; convert the file to another type")
    return arch


def _gguf_call(path: Path, what: str, fn: Any, **kwargs: Any) -> Any:
    """``fn(path.parent, gguf_file=path.name, **kwargs)`` without progress bars (the library prints nothing); its
    errors typed."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    shown, bar = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(bar, disable=True)  # its dequantization bar is a plain tqdm
    try:
        return fn(str(path.parent), gguf_file=path.name, local_files_only=True, **kwargs)
    except (NotImplementedError, ValueError, KeyError, OSError) as err:
        text = " ".join(str(err).split())[:300]
        raise UnsupportedModelError(f"{path}: transformers cannot read its {what}: {text or type(err).__name__}") \
            from None
    finally:
        gguf_utils.tqdm = bar
        if shown:
            hf_logging.enable_progress_bar()


def load_gguf(path: str | Path, *, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file, dequantized into ``dtype`` (None/"auto": float32), in eval mode.

    The model is an ordinary transformers model afterwards: the GGUF quantization marks transformers leaves on it
    (which refuse ``save_pretrained``) are removed, since the weights are dense.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    check_gguf(path)
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype in (None, "auto"):
        torch_dtype = torch.float32
    tokenizer = _gguf_call(path, "tokenizer", AutoTokenizer.from_pretrained)
    model = _gguf_call(path, "weights", AutoModelForCausalLM.from_pretrained, dtype=torch_dtype)
    _drop_gguf_marks(model)
    model.config.name_or_path = model.name_or_path = str(path)  # an adapter trained on it records the file
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _drop_gguf_marks(model: Any) -> None:
    """Unmark a dequantized GGUF model: transformers' own `remove_quantization_config` (quantizer, config entry,
    ``is_quantized``) and the per-module ``config._is_quantized`` flags it set after loading."""
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = False


def model_config(name_or_path: str | Path) -> dict[str, Any]:
    """The transformers config (as a dict) of a model directory, its ``config.json``, or a GGUF file."""
    import json

    gguf = gguf_path(name_or_path)
    if gguf is not None:
        from transformers import AutoConfig

        check_gguf(gguf)
        config: dict[str, Any] = _gguf_call(gguf, "config", AutoConfig.from_pretrained).to_dict()
        config.pop("quantization_config", None)
        return config
    path = Path(name_or_path).expanduser()
    path = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable JSON config ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a transformers config (a JSON object)")
    return data


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The tokenizer of a model directory, a hub id, or a GGUF file (the one it carries)."""
    from transformers import AutoTokenizer

    gguf = gguf_path(name_or_path)
    if gguf is not None:
        return _gguf_call(gguf, "tokenizer", AutoTokenizer.from_pretrained)
    return AutoTokenizer.from_pretrained(str(name_or_path))


def import_gguf(path: str | Path, out: str | Path, *, dtype: Any = None, overwrite: bool = False) -> Path:
    """Write the GGUF model at ``path`` as a transformers directory ``out``: safetensors (``dtype``, default
    float32), tokenizer, chat template, ``manifest.json``. Returns ``out``."""
    from llmtune.core.manifest import write_manifest
    from llmtune.core.paths import check_output_dir

    src = gguf_path(path)
    if src is None:
        raise ConfigError(f"{path}: not a .gguf file (nor a directory holding one)")
    target = check_output_dir(out, [src])
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"--out {target} exists and is not empty; choose a new directory or pass --overwrite")
    model, tokenizer = load_gguf(src, dtype=dtype)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    write_manifest(target)
    return target
