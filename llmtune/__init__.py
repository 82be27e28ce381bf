"""llmtune: LLM fine-tuning, quantization, evaluation and GPU-memory planning as a library.

``import llmtune`` is light (no torch, no transformers): backends import their libraries when used.

    import llmtune
    rouge = llmtune.get_metric("rouge")
    rouge.compute(["it is very cold outside."], ["it is cold outside."]).scores
"""

from llmtune._version import __version__
from llmtune.core import (
    Backend,
    BackendInfo,
    BackendUnavailableError,
    ConfigError,
    GPURequiredError,
    InvalidOptionError,
    LlmtuneError,
    Metric,
    MetricResult,
    MissingDependencyError,
    PluginError,
    Quantizer,
    Task,
    TaskResult,
    Trainer,
    TrainResult,
    UnknownBackendError,
    UnknownOptionError,
    get_metric,
    get_quantizer,
    get_task,
    get_trainer,
    list_backends,
    register_metric,
    register_quantizer,
    register_task,
    register_trainer,
)

__all__ = [
    "Backend", "BackendInfo", "BackendUnavailableError", "ConfigError", "GPURequiredError", "InvalidOptionError",
    "LlmtuneError", "Metric", "MetricResult", "MissingDependencyError", "PluginError", "Quantizer",
    "TrainResult", "Trainer", "UnknownBackendError", "UnknownOptionError", "__version__", "get_metric",
    "get_quantizer", "get_trainer", "list_backends", "register_metric", "register_quantizer", "register_trainer",
]

#: Subpackages reachable as attributes (``llmtune.memory.estimate_training``), imported on first use.
_LAZY_SUBPACKAGES = frozenset({"memory", "metrics", "quantizers", "trainers", "data", "models", "export", "tasks"})
__all__ += ["Task", "TaskResult", "evaluate", "get_task", "register_task"]

from llmtune.core import Reward, get_reward, register_reward  # noqa: E402 - the fifth kind (reward functions)

__all__ += ["Reward", "get_reward", "register_reward"]
_LAZY_SUBPACKAGES = _LAZY_SUBPACKAGES | {"rewards"}


def evaluate(model: object, tasks: object, **kwargs: object) -> dict[str, TaskResult]:
    """Run benchmark tasks on a model; see `llmtune.tasks.run.evaluate` (torch is imported on call)."""
    from llmtune.tasks.run import evaluate as _evaluate

    return _evaluate(model, tasks, **kwargs)  # type: ignore[arg-type]


def __getattr__(name: str) -> object:
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"llmtune.{name}")
    raise AttributeError(f"module 'llmtune' has no attribute {name!r}")
