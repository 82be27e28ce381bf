"""GPTQ delegated to other libraries: backend ``gptqmodel`` (GPTQModel) and ``auto-gptq`` (AutoGPTQ, dead).

Availability is decided from installed package *metadata* (`importlib.metadata`), never by importing
them: importing GPTQModel takes seconds and AutoGPTQ's import itself fails with transformers >= 5.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from llmtune.core.errors import BackendUnavailableError, GPURequiredError, InvalidOptionError
from llmtune.core.interfaces import ProgressFn, Quantizer
from llmtune.core.versions import installed_version, release
from llmtune.quantizers.gptq import GPTQOptions, gptq_config

#: Use instead of the delegates when they cannot run.
_INSTEAD = "use backend 'llmtune' (the default: llmtune.get_quantizer('gptq')) or backend 'gptqmodel'"


def _min_requirement(dist: str, dep: str) -> str | None:
    """The ``>=`` lower bound that ``dist``'s metadata puts on ``dep`` (no extras), if any."""
    for req in importlib.metadata.requires(dist) or []:
        if ";" in req and "extra" in req.split(";", 1)[1]:
            continue
        m = re.match(rf"^\s*{re.escape(dep)}\s*(\[[^\]]*\])?\s*(.*)$", req.split(";")[0], re.IGNORECASE)
        if m:
            low = re.search(r">=\s*([\w.]+)", m.group(2))
            if low:
                return low.group(1)
    return None


def gptqmodel_unavailable_reason() -> str | None:
    """Why GPTQModel cannot run here (not installed, or its torch/transformers floor not met), or None."""
    version = installed_version("gptqmodel")
    if version is None:
        return "GPTQModel is not installed: pip install 'llmtune[gptq]' (needs a recent torch, e.g. >= 2.14.1 for 7.7)"
    for dep in ("torch", "transformers"):
        need, have = _min_requirement("gptqmodel", dep), installed_version(dep)
        if need and have and release(have) < release(need):
            return (f"gptqmodel {version} needs {dep} >= {need}, but {dep} {have} is installed; "
                    f"upgrade {dep} or install an older gptqmodel, or use backend 'llmtune'")
    return None


def autogptq_unavailable_reason() -> str | None:
    """Why AutoGPTQ cannot run here: it is unmaintained and does not import with transformers >= 5."""
    version, tf = installed_version("auto-gptq") or installed_version("auto_gptq"), installed_version("transformers")
    dead = "AutoGPTQ is unmaintained (archived in 2025; its last release, 0.7.1, is from March 2024)"
    if tf is not None and release(tf) >= (5,):
        have = f"auto-gptq {version} is installed, but it" if version else "auto-gptq is not installed, and it"
        return (f"{have} cannot be imported with transformers {tf} (>= 5 removed "
                f"transformers.modeling_utils.no_init_weights, which it imports); {dead}. Instead, {_INSTEAD}")
    if version is None:
        return f"auto-gptq is not installed; {dead}. Instead, {_INSTEAD}"
    return None


def _gptqmodel_config(o: GPTQOptions) -> Any:
    from gptqmodel import QuantizeConfig

    return QuantizeConfig(bits=o.bits, group_size=o.group_size, desc_act=o.act_order, sym=o.sym,
                          damp_percent=o.damp_percent, true_sequential=o.true_sequential,
                          static_groups=o.static_groups)


def _examples(calibration: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Calibration batches as the list of ``{"input_ids", "attention_mask"}`` rows the libraries take."""
    import torch

    rows: list[dict[str, Any]] = []
    for batch in calibration or []:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        ids = ids.reshape(-1, ids.shape[-1]) if ids.dim() else ids.reshape(1, 1)
        for row in ids:
            rows.append({"input_ids": row[None].long(), "attention_mask": torch.ones_like(row[None])})
    if not rows:
        from llmtune.quantizers.gptq import CalibrationError

        raise CalibrationError("calibration is empty: GPTQ needs at least one batch of token ids "
                               "(an iterable of LongTensor [batch, seq])")
    return rows


def _save_for_library(model: Any, tmp: Path) -> Path:
    """Write ``model`` (and its tokenizer files when it was loaded from a local dir) where a library can load it."""
    model.save_pretrained(tmp, safe_serialization=True)
    src = Path(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    if src.is_dir():
        for f in src.iterdir():
            if f.is_file() and ("tokenizer" in f.name or f.name in ("special_tokens_map.json", "vocab.json",
                                                                     "merges.txt", "chat_template.jinja")):
                shutil.copy(f, tmp / f.name)
    return tmp


class _DelegatedGPTQ(Quantizer):
    """What the delegates share: GPTQ's options, and the library's wrapper kept on the module it returns."""

    name: ClassVar[str] = "gptq"
    Options: ClassVar[type] = GPTQOptions
    #: The attribute of the returned module that holds the library's wrapper object.
    wrapper_attr: ClassVar[str] = ""

    def _unwrap(self, wrapper: Any) -> Any:
        """The HF module inside ``wrapper``, which keeps the wrapper (not as a submodule: it contains the module)."""
        module = wrapper.model
        object.__setattr__(module, self.wrapper_attr, wrapper)
        return module

    def _wrapper_of(self, model: Any) -> Any:
        wrapper = getattr(model, self.wrapper_attr, None)
        if wrapper is None:
            raise InvalidOptionError(f"save: this model was not quantized by backend {self.backend!r}")
        return wrapper


class GPTQModelQuantizer(_DelegatedGPTQ):
    """GPTQ by GPTQModel (ModelCloud): the maintained reference implementation and its kernels."""

    backend: ClassVar[str] = "gptqmodel"
    wrapper_attr: ClassVar[str] = "_llmtune_gptqmodel"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return gptqmodel_unavailable_reason()

    @staticmethod
    def _import() -> Any:
        if (os.cpu_count() or 1) <= 2:
            # GPTQModel refuses to start on 2-core machines unless told how many CPU workers to use.
            os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
        import gptqmodel

        return gptqmodel

    def quantize(self, model: Any, calibration: Iterable[Any] | None = None, *,
                 progress: ProgressFn | None = None) -> Any:
        """Save ``model`` to a temporary dir, quantize it with GPTQModel, return its (quantized) HF module.

        GPTQModel quantizes all blocks in one call: ``progress`` hears of one step, at the end.
        """
        gm = self._import()
        examples = _examples(calibration)
        if self.options.skip_modules not in ((), ("lm_head",)):
            raise InvalidOptionError("backend 'gptqmodel' only skips lm_head; use backend 'llmtune' to skip "
                                     f"{list(self.options.skip_modules)}", field="skip_modules")
        # GPTQModel reads the source directory again when saving: keep it as long as the wrapper lives.
        tmp = tempfile.mkdtemp(prefix="llmtune-gptqmodel-")
        src = _save_for_library(model, Path(tmp))
        wrapper = gm.GPTQModel.load(str(src), _gptqmodel_config(self.options))
        weakref.finalize(wrapper, shutil.rmtree, tmp, True)
        wrapper.quantize(examples, batch_size=1)
        if progress:
            progress("all blocks", 1, 1)
        return self._unwrap(wrapper)

    def save(self, model: Any, path: str | Path) -> Path:
        """GPTQModel's own ``save`` (the standard GPTQ checkpoint)."""
        wrapper = self._wrapper_of(model)
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        wrapper.save(str(out))
        return out

    def load(self, path: str | Path, **kwargs: Any) -> Any:
        """Load a GPTQ checkpoint with GPTQModel (torch kernel on CPU); returns the HF module."""
        gm = self._import()
        device = kwargs.pop("device", "cpu")
        backend = kwargs.pop("backend", gm.BACKEND.TORCH if device == "cpu" else gm.BACKEND.AUTO)
        wrapper = gm.GPTQModel.load(str(path), device=device, backend=backend, **kwargs)
        return self._unwrap(wrapper)

    def hf_quantization_config(self) -> Any:
        """transformers' ``GPTQConfig`` with these settings (load-time quantization runs GPTQModel)."""
        return gptq_config(self.options)


class AutoGPTQQuantizer(_DelegatedGPTQ):
    """GPTQ by AutoGPTQ: kept only to explain why it cannot run (unmaintained; breaks on transformers >= 5)."""

    backend: ClassVar[str] = "auto-gptq"
    wrapper_attr: ClassVar[str] = "_llmtune_autogptq"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return autogptq_unavailable_reason()

    def _check(self) -> Any:
        reason = autogptq_unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"quantizer 'gptq' backend 'auto-gptq' cannot run here: {reason}")
        import torch

        if not torch.cuda.is_available():
            raise GPURequiredError("auto-gptq quantizes only on a CUDA GPU ('Load pretrained model to do "
                                   f"quantization requires CUDA available'). Instead, {_INSTEAD}")
        import auto_gptq

        return auto_gptq

    def quantize(self, model: Any, calibration: Iterable[Any] | None = None, *,
                 progress: ProgressFn | None = None) -> Any:
        """Quantize with AutoGPTQ (CUDA, transformers < 5 only); ``progress`` hears of one step, at the end."""
        ag = self._check()
        o = self.options
        examples = _examples(calibration)
        cfg = ag.BaseQuantizeConfig(bits=o.bits, group_size=o.group_size, damp_percent=o.damp_percent,
                                    desc_act=o.act_order, sym=o.sym, true_sequential=o.true_sequential,
                                    static_groups=o.static_groups)
        tmp = tempfile.mkdtemp(prefix="llmtune-autogptq-")
        src = _save_for_library(model, Path(tmp))
        wrapper = ag.AutoGPTQForCausalLM.from_pretrained(str(src), cfg)
        weakref.finalize(wrapper, shutil.rmtree, tmp, True)
        wrapper.quantize(examples)
        if progress:
            progress("all blocks", 1, 1)
        return self._unwrap(wrapper)

    def save(self, model: Any, path: str | Path) -> Path:
        """AutoGPTQ's ``save_quantized``."""
        self._check()
        wrapper = self._wrapper_of(model)
        wrapper.save_quantized(str(path), use_safetensors=True)
        return Path(path)

    def load(self, path: str | Path, **kwargs: Any) -> Any:
        """AutoGPTQ's ``from_quantized``."""
        ag = self._check()
        wrapper = ag.AutoGPTQForCausalLM.from_quantized(str(path), use_safetensors=True, **kwargs)
        return self._unwrap(wrapper)
