"""Typed errors. Every one derives from `LlmtuneError` and says what to do next."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LlmtuneError(Exception):
    """Base of every error llmtune raises on purpose."""


class UnknownBackendError(LlmtuneError, LookupError):
    """A name or backend that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # LookupError/KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(LlmtuneError, ImportError):
    """A backend whose optional dependency is not installed; names the pip extra."""


class BackendUnavailableError(LlmtuneError, RuntimeError):
    """A backend that is installed but cannot run here (incompatible versions, broken plugin)."""


class GPURequiredError(LlmtuneError, RuntimeError):
    """A path that needs a CUDA GPU, asked for on a machine without one."""


class _NamesField:
    """Mixin: the error names the option it is about in ``field`` (None when it is about no single one)."""

    field: str | None

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        self.field = field


class UnknownOptionError(_NamesField, LlmtuneError, TypeError):
    """An option a backend does not take: never silently ignored. ``field`` is the key given."""


class ArgumentTypeError(LlmtuneError, TypeError):
    """An argument of the wrong kind (e.g. a path where a model object is needed); names what was expected."""


class InvalidOptionError(_NamesField, LlmtuneError, ValueError):
    """An option with a value the backend cannot use. ``field`` names the option (e.g. ``"group_size"``)."""


class ConfigError(LlmtuneError, ValueError):
    """A configuration file or data file that cannot be used; names file, line and field."""


class DamagedFileError(LlmtuneError, ValueError):
    """A checkpoint or saved model whose files are missing, truncated or altered; names each file."""


class OutputDirError(ConfigError):
    """An output directory that holds another run (or a resume whose settings changed); names what differs."""


class OutputLockedError(OutputDirError):
    """An output directory another live process is writing (its lock is held); names the directory and owner."""


class DiskFullError(LlmtuneError, OSError):
    """A write that ran out of space (``ENOSPC``, ``EDQUOT``, or a file-size limit, ``EFBIG``); names the path."""

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class PluginError(LlmtuneError):
    """A plugin that failed to load or registered something inconsistent."""


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `word`, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' Did you mean 'x'?' when something is close, else ''."""
    match = closest(word, candidates)
    return f" Did you mean {match!r}?" if match else ""


class MergeNotSupportedError(LlmtuneError, NotImplementedError):
    """An adapter that cannot be folded into the base weights (a non-linear bottleneck adapter, prefix tuning)."""


class UnsupportedModelError(ConfigError):
    """A model file llmtune's loaders cannot read (a GGUF architecture or tensor type transformers lacks); names it."""
