"""The core: interfaces, result types, registry and errors. Knows no backend, imports nothing heavy."""

from llmtune.core.errors import (
    ArgumentTypeError,
    BackendUnavailableError,
    ConfigError,
    GPURequiredError,
    InvalidOptionError,
    LlmtuneError,
    MissingDependencyError,
    PluginError,
    UnknownBackendError,
    UnknownOptionError,
)
from llmtune.core.interfaces import Backend, Metric, Quantizer, Task, Trainer
from llmtune.core.registry import (
    REGISTRY,
    BackendInfo,
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
from llmtune.core.results import LazyMapping, MetricResult, TaskResult, TrainResult

__all__ = [
    "REGISTRY", "ArgumentTypeError", "Backend", "BackendInfo", "BackendUnavailableError", "ConfigError", "GPURequiredError",
    "InvalidOptionError", "LazyMapping", "LlmtuneError", "Metric", "MetricResult", "MissingDependencyError",
    "PluginError", "Quantizer", "TrainResult", "Trainer", "UnknownBackendError", "UnknownOptionError",
    "get_metric", "get_quantizer", "get_trainer", "list_backends", "register_metric", "register_quantizer",
    "register_trainer",
]
__all__ += ["Task", "TaskResult", "get_task", "register_task"]

from llmtune.core.interfaces import Reward  # noqa: E402 - the fifth kind, added after the four
from llmtune.core.registry import get_reward, register_reward  # noqa: E402

__all__ += ["Reward", "get_reward", "register_reward"]
