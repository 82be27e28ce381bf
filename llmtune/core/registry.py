"""The registry of backends: a *name* says what, a *backend* says how.

Entries come from three places, all lazy:

* built-ins, declared as data by ``llmtune.metrics``, ``llmtune.quantizers`` and ``llmtune.trainers``
  (``declare(...)`` with a ``"module:Class"`` target that is imported only when used);
* in-process registration with the ``register_metric`` / ``register_quantizer`` / ``register_trainer``
  decorators;
* third-party packages, through the entry-point groups ``llmtune.metrics``, ``llmtune.quantizers`` and
  ``llmtune.trainers``, loaded the first time the registry of that kind is consulted. A plugin that fails
  to import is reported (a warning, and ``list_backends`` shows it unavailable) and breaks nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from llmtune.core.errors import (
    ArgumentTypeError,
    BackendUnavailableError,
    LlmtuneError,
    MissingDependencyError,
    PluginError,
    UnknownBackendError,
    did_you_mean,
)
from llmtune.core.interfaces import KINDS, Backend, Metric, Quantizer, Reward, Task, Trainer

B = TypeVar("B", bound=type[Backend])

#: Entry-point group of each kind.
ENTRY_POINT_GROUPS = {"metric": "llmtune.metrics", "quantizer": "llmtune.quantizers", "trainer": "llmtune.trainers"}
ENTRY_POINT_GROUPS["task"] = "llmtune.tasks"
ENTRY_POINT_GROUPS["reward"] = "llmtune.rewards"
#: The package that declares each kind's built-in backends (imported lazily; it imports no heavy library).
_BUILTIN_PACKAGES = {"metric": "llmtune.metrics", "quantizer": "llmtune.quantizers", "trainer": "llmtune.trainers"}
_BUILTIN_PACKAGES["task"] = "llmtune.tasks"
_BUILTIN_PACKAGES["reward"] = "llmtune.rewards"


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """One row of `list_backends`: what is registered and whether it can run here."""

    kind: str
    name: str
    backend: str
    default: bool
    available: bool
    reason: str | None
    extra: str | None
    source: str


@dataclasses.dataclass
class _Entry:
    kind: str
    name: str
    backend: str
    target: str | type[Backend] | None  # "module:Class", a class, or None for a broken plugin
    requires: tuple[str, ...] = ()
    extra: str | None = None
    source: str = "builtin"
    error: str | None = None  # set for a plugin that failed to load

    def load(self) -> type[Backend]:
        if self.error is not None or self.target is None:
            raise BackendUnavailableError(f"{self.kind} {self.name!r} backend {self.backend!r}: {self.error}")
        if isinstance(self.target, str):
            module_name, _, attr = self.target.partition(":")
            cls: type[Backend] = getattr(importlib.import_module(module_name), attr)
            self.target = cls
            return cls
        return self.target


def _missing_modules(requires: tuple[str, ...]) -> list[str]:
    """The required top-level modules that are not installed (found without importing them)."""
    missing = []
    for module in requires:
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except (ImportError, ValueError):
            missing.append(module)
    return missing


def _install_hint(extra: str | None, missing: list[str]) -> str:
    if extra:
        return f"pip install 'llmtune[{extra}]'"
    return "pip install " + " ".join(missing)


class Registry:
    """All registered backends of all kinds. One process-wide instance: `REGISTRY`."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._defaults: dict[tuple[str, str], str] = {}
        self._ready: set[str] = set()
        self._lock = threading.RLock()

    # -- adding entries -------------------------------------------------------------------------
    def declare(
        self,
        kind: str,
        name: str,
        backend: str,
        target: str | type[Backend],
        *,
        requires: tuple[str, ...] = (),
        extra: str | None = None,
        default: bool = False,
        source: str = "builtin",
    ) -> None:
        """Add one backend. ``target`` is a class or ``"module:Class"`` (imported when first used)."""
        self._check_kind(kind)
        for label, value in (("name", name), ("backend", backend)):
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise PluginError(f"{kind} {label} must be a non-empty string without spaces, got {value!r}")
        key = (kind, name, backend)
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None and existing.source != source:
                raise PluginError(
                    f"{kind} {name!r} backend {backend!r} is already registered by {existing.source}; "
                    f"{source} cannot replace it"
                )
            self._entries[key] = _Entry(kind, name, backend, target, tuple(requires), extra, source)
            current = self._defaults.get((kind, name))
            if current is None:
                self._defaults[(kind, name)] = backend
            elif default and not (self._entries[(kind, name, current)].source == "builtin" and source != "builtin"):
                # An explicit default wins, except that a plugin never takes it away from a built-in.
                self._defaults[(kind, name)] = backend

    def register_class(self, cls: type[Backend], *, requires: tuple[str, ...] = (), extra: str | None = None,
                       default: bool = False, source: str = "runtime") -> type[Backend]:
        """Register a `Backend` subclass under its own ``kind``, ``name`` and ``backend``."""
        if not (isinstance(cls, type) and issubclass(cls, Backend)) or not cls.kind:
            raise PluginError(f"{cls!r} is not a Metric, Quantizer, Trainer or Task subclass")
        if not cls.name or not cls.backend:
            raise PluginError(f"{cls.__qualname__} must set the class attributes 'name' and 'backend'")
        self.declare(cls.kind, cls.name, cls.backend, cls, requires=requires, extra=extra,
                     default=default, source=source)
        return cls

    # -- discovery ------------------------------------------------------------------------------
    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise UnknownBackendError(f"unknown kind {kind!r}; kinds are: {', '.join(KINDS)}.{did_you_mean(kind, KINDS)}")

    def _ensure(self, kind: str) -> None:
        """Declare built-ins and load entry points of ``kind`` once."""
        if kind in self._ready:
            return
        with self._lock:
            if kind in self._ready:
                return
            self._ready.add(kind)
            importlib.import_module(_BUILTIN_PACKAGES[kind])
            self._load_entry_points(kind)

    def _load_entry_points(self, kind: str) -> None:
        import importlib.metadata  # only when a registry is first consulted: it is slow to import

        group = ENTRY_POINT_GROUPS[kind]
        for ep in importlib.metadata.entry_points(group=group):
            dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
            source = f"plugin {dist} ({ep.name} = {ep.value})"
            try:
                obj = ep.load()
                self._register_plugin_object(kind, obj, source)
            except Exception as exc:  # a broken plugin must not break the others
                name, _, backend = ep.name.partition(".")
                reason = f"plugin {dist!r} failed to load ({ep.value}): {type(exc).__name__}: {exc}"
                warnings.warn(f"llmtune: {reason}", RuntimeWarning, stacklevel=3)
                key = (kind, name, backend or dist)
                if key not in self._entries:
                    self._entries[key] = _Entry(kind, name, backend or dist, None, source=source, error=reason)
                    self._defaults.setdefault((kind, name), backend or dist)

    def _register_plugin_object(self, kind: str, obj: Any, source: str) -> None:
        expected = KINDS[kind]
        if isinstance(obj, type) and issubclass(obj, Backend):
            if not issubclass(obj, expected):
                raise PluginError(f"{obj.__qualname__} is a {obj.kind}, but was declared in the {kind} group")
            self.register_class(obj, source=source,
                                default=bool(getattr(obj, "default", False)),
                                requires=tuple(getattr(obj, "requires", ())),
                                extra=getattr(obj, "extra", None))
        elif callable(obj):
            obj(self)  # a hook that declares several backends: ``def register(registry): ...``
        elif not hasattr(obj, "__name__"):
            raise PluginError(f"entry point object {obj!r} is neither a {expected.__name__} subclass nor a module")
        # a module: importing it ran its register_* decorators

    # -- queries --------------------------------------------------------------------------------
    def _entry(self, kind: str, name: str, backend: str | None) -> _Entry:
        self._check_kind(kind)
        self._ensure(kind)
        names = sorted({n for (k, n, _) in self._entries if k == kind})
        for what, value in (("name", name), ("backend", backend)):
            if not isinstance(value, str) and (what == "name" or value is not None):
                raise ArgumentTypeError(f"{kind} {what} must be a string, got {value!r} ({type(value).__name__}); "
                                        f"known {kind}s: {', '.join(names) or 'none'}")
        if name not in names:
            raise UnknownBackendError(
                f"unknown {kind} {name!r}.{did_you_mean(name, names)} Known {kind}s: {', '.join(names) or 'none'}."
            )
        if backend is None:
            backend = self._defaults[(kind, name)]
        entry = self._entries.get((kind, name, backend))
        if entry is None:
            backends = sorted(b for (k, n, b) in self._entries if k == kind and n == name)
            raise UnknownBackendError(
                f"{kind} {name!r} has no backend {backend!r}.{did_you_mean(backend, backends)} "
                f"Its backends: {', '.join(backends)}."
            )
        return entry

    def _availability(self, entry: _Entry) -> tuple[bool, str | None]:
        if entry.error is not None:
            return False, entry.error
        missing = _missing_modules(entry.requires)
        if missing:
            return False, f"needs {', '.join(missing)}: {_install_hint(entry.extra, missing)}"
        try:
            reason = entry.load().unavailable_reason()
        except Exception as exc:
            return False, f"failed to import: {type(exc).__name__}: {exc}"
        return (reason is None), reason

    def get_class(self, kind: str, name: str, backend: str | None = None) -> type[Backend]:
        """The backend class, after checking it can run here."""
        entry = self._entry(kind, name, backend)
        if entry.error is not None:
            raise BackendUnavailableError(entry.error)
        missing = _missing_modules(entry.requires)
        if missing:
            raise MissingDependencyError(
                f"{kind} {name!r} backend {entry.backend!r} needs {', '.join(missing)}, which is not installed. "
                f"Install it with: {_install_hint(entry.extra, missing)}"
            )
        cls = entry.load()
        reason = cls.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"{kind} {name!r} backend {entry.backend!r} cannot run here: {reason}")
        return cls

    def create(self, kind: str, name: str, backend: str | None = None, **options: Any) -> Backend:
        """An instance of the backend, configured with ``options``."""
        return self.get_class(kind, name, backend)(**options)

    def default_backend(self, kind: str, name: str) -> str:
        return self._entry(kind, name, None).backend

    def list(self, kind: str | None = None) -> list[BackendInfo]:
        kinds = [kind] if kind is not None else list(KINDS)
        rows = []
        for k in kinds:
            self._check_kind(k)
            self._ensure(k)
            for (ek, name, backend), entry in sorted(self._entries.items()):
                if ek != k:
                    continue
                available, reason = self._availability(entry)
                rows.append(BackendInfo(
                    kind=k, name=name, backend=backend, default=self._defaults.get((k, name)) == backend,
                    available=available, reason=reason, extra=entry.extra, source=entry.source,
                ))
        order = list(KINDS)
        rows.sort(key=lambda r: (order.index(r.kind), r.name, not r.default, r.backend))
        return rows


REGISTRY = Registry()


def declare(kind: str, name: str, backend: str, target: str, **kwargs: Any) -> None:
    """Declare a built-in backend by dotted target (used by llmtune's own packages)."""
    REGISTRY.declare(kind, name, backend, target, **kwargs)


def _decorator(kind: str) -> Callable[..., Any]:
    def register(cls: B | None = None, *, requires: tuple[str, ...] = (), extra: str | None = None,
                 default: bool = False) -> Any:
        def apply(c: B) -> B:
            if not (isinstance(c, type) and issubclass(c, KINDS[kind])):
                raise PluginError(f"register_{kind} expects a {KINDS[kind].__name__} subclass, got {c!r}")
            REGISTRY.register_class(c, requires=requires, extra=extra, default=default)
            return c
        return apply(cls) if cls is not None else apply
    register.__name__ = f"register_{kind}"
    register.__doc__ = (f"Class decorator registering a {KINDS[kind].__name__} backend under its ``name`` and "
                        f"``backend`` attributes; ``default=True`` makes it the name's default backend.")
    return register


register_metric = _decorator("metric")
register_quantizer = _decorator("quantizer")
register_trainer = _decorator("trainer")
register_task = _decorator("task")
register_reward = _decorator("reward")


def get_metric(name: str, backend: str | None = None, **options: Any) -> Metric:
    """A configured metric, e.g. ``get_metric("rouge", rouge_types=["rougeL"])``."""
    obj = REGISTRY.create("metric", name, backend, **options)
    assert isinstance(obj, Metric)
    return obj


def get_quantizer(name: str, backend: str | None = None, **options: Any) -> Quantizer:
    """A configured quantizer, e.g. ``get_quantizer("gptq", bits=4, group_size=128)``."""
    obj = REGISTRY.create("quantizer", name, backend, **options)
    assert isinstance(obj, Quantizer)
    return obj


def get_trainer(name: str, backend: str | None = None, **options: Any) -> Trainer:
    """A configured trainer, e.g. ``get_trainer("lora", backend="unsloth", rank=16)``."""
    obj = REGISTRY.create("trainer", name, backend, **options)
    assert isinstance(obj, Trainer)
    return obj


def get_task(name: str, backend: str | None = None, **options: Any) -> Task:
    """A configured task, e.g. ``get_task("hellaswag", data="hellaswag_val.jsonl", num_fewshot=0)``."""
    obj = REGISTRY.create("task", name, backend, **options)
    assert isinstance(obj, Task)
    return obj


def get_reward(name: str, backend: str | None = None, **options: Any) -> Reward:
    """A configured reward function, e.g. ``get_reward("numeric_answer", field="answer")``."""
    obj = REGISTRY.create("reward", name, backend, **options)
    assert isinstance(obj, Reward)
    return obj


def list_backends(kind: str | None = None) -> list[BackendInfo]:
    """Every registered backend (of one kind, or all), with whether it can run here and why not."""
    return REGISTRY.list(kind)


__all__ = [
    "BackendInfo", "REGISTRY", "Registry", "declare", "get_metric", "get_quantizer", "get_trainer",
    "list_backends", "register_metric", "register_quantizer", "register_trainer", "LlmtuneError",
]
__all__ += ["get_task", "register_task"]
__all__ += ["get_reward", "register_reward"]
