"""The registry: names vs backends, defaults, errors that say what to do, decorators, entry-point plugins."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import warnings

import pytest

import llmtune
from llmtune.core.errors import (
    BackendUnavailableError,
    InvalidOptionError,
    LlmtuneError,
    MissingDependencyError,
    PluginError,
    UnknownBackendError,
    UnknownOptionError,
)
from llmtune.core.interfaces import Metric
from llmtune.core.options import check_choice
from llmtune.core.registry import Registry
from llmtune.core.results import MetricResult


class _Echo(Metric):
    name = "echo"
    backend = "python"

    @dataclasses.dataclass(frozen=True)
    class Options:
        scale: float = 1.0
        mode: str = "plain"

        def __post_init__(self) -> None:
            check_choice("mode", self.mode, ("plain", "fancy"))

    def compute(self, predictions, references):  # type: ignore[no-untyped-def]
        return MetricResult({"n": float(len(predictions)) * self.options.scale}, {}, "echo")


def _fresh() -> Registry:
    reg = Registry()
    reg._ready.update({"metric", "quantizer", "trainer"})  # no built-ins, no entry points
    return reg


BUILTINS = {
    ("metric", "rouge"): ["numpy", "rouge-score"],
    ("metric", "bleu"): ["numpy", "sacrebleu", "nltk"],
    ("quantizer", "nf4"): ["bnb"],
    ("quantizer", "fp4"): ["bnb"],
    ("quantizer", "int8"): ["bnb"],
    ("quantizer", "gptq"): ["llmtune", "gptqmodel", "auto-gptq"],
    ("quantizer", "rtn"): ["llmtune"],
    ("trainer", "lora"): ["peft", "unsloth"],
}


@pytest.mark.parametrize(("kind_name", "backends"), list(BUILTINS.items()), ids=lambda v: str(v))
def test_contract_builtins_are_registered_with_their_default_first(kind_name, backends) -> None:
    kind, name = kind_name
    rows = [r for r in llmtune.list_backends(kind) if r.name == name]
    assert sorted(r.backend for r in rows) == sorted(backends)
    (default,) = [r.backend for r in rows if r.default]
    assert default == backends[0]
    for row in rows:
        assert row.available or row.reason, f"{row} is unavailable without a reason"


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(UnknownBackendError, match=r"Did you mean 'rouge'\?") as info:
        llmtune.get_metric("rouj")
    assert isinstance(info.value, LlmtuneError)
    assert "bleu" in str(info.value) and "rouge" in str(info.value)


def test_unknown_backend_lists_the_backends() -> None:
    with pytest.raises(UnknownBackendError, match="sacrebleu") as info:
        llmtune.get_metric("bleu", backend="sacreblue")
    assert "Did you mean 'sacrebleu'" in str(info.value)


def test_unknown_kind() -> None:
    with pytest.raises(UnknownBackendError, match="kinds are"):
        llmtune.list_backends("metrics")


def test_options_unknown_key_is_an_error_naming_it() -> None:
    reg = _fresh()
    reg.register_class(_Echo)
    with pytest.raises(UnknownOptionError, match=r"'scael'.*Did you mean 'scale'") as info:
        reg.create("metric", "echo", scael=2.0)
    assert "metric 'echo' (backend 'python')" in str(info.value)
    assert isinstance(info.value, TypeError)


def test_options_bad_value_is_an_error_naming_it() -> None:
    reg = _fresh()
    reg.register_class(_Echo)
    with pytest.raises(InvalidOptionError, match=r"mode='fanci'.*Did you mean 'fancy'"):
        reg.create("metric", "echo", mode="fanci")
    assert reg.create("metric", "echo", scale=2.0).compute(["a", "b"], ["a", "b"]).scores == {"n": 4.0}


def test_missing_dependency_names_the_extra() -> None:
    reg = _fresh()
    reg.declare("metric", "needs", "ghost", "llmtune_no_such_module:X", requires=("llmtune_no_such_module",),
                extra="metrics")
    with pytest.raises(MissingDependencyError, match=r"pip install 'llmtune\[metrics\]'"):
        reg.create("metric", "needs")
    (row,) = reg.list("metric")
    assert not row.available and "llmtune[metrics]" in (row.reason or "")


def test_unavailable_reason_is_reported_and_raised() -> None:
    class NeedsGpu(_Echo):
        backend = "cuda-only"

        @classmethod
        def unavailable_reason(cls) -> str | None:
            return "needs a CUDA GPU; none is visible"

    reg = _fresh()
    reg.register_class(_Echo)
    reg.register_class(NeedsGpu)
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        reg.create("metric", "echo", backend="cuda-only")
    rows = {r.backend: r for r in reg.list("metric")}
    assert rows["python"].available and not rows["cuda-only"].available


def test_first_backend_is_default_and_explicit_default_wins() -> None:
    reg = _fresh()
    reg.register_class(_Echo)
    assert reg.default_backend("metric", "echo") == "python"

    class Other(_Echo):
        backend = "other"

    reg.register_class(Other, default=True)
    assert reg.default_backend("metric", "echo") == "other"


def test_plugin_cannot_take_a_builtin_default_or_replace_a_builtin() -> None:
    reg = _fresh()
    reg.declare("metric", "echo", "python", _Echo, default=True)

    class Other(_Echo):
        backend = "other"

    reg.register_class(Other, default=True, source="plugin x")
    assert reg.default_backend("metric", "echo") == "python"
    with pytest.raises(PluginError, match="already registered"):
        reg.register_class(_Echo, source="plugin x")


def test_register_decorators_add_to_the_global_registry() -> None:
    @llmtune.register_metric
    class Shout(_Echo):
        name = "shout_test_only"
        backend = "python"

    assert isinstance(llmtune.get_metric("shout_test_only"), Shout)
    with pytest.raises(PluginError, match="Quantizer subclass"):
        llmtune.register_quantizer(Shout)


def test_bad_names_are_rejected() -> None:
    reg = _fresh()

    class NoName(_Echo):
        name = ""

    with pytest.raises(PluginError, match="'name' and 'backend'"):
        reg.register_class(NoName)
    with pytest.raises(PluginError, match="without spaces"):
        reg.declare("metric", "two words", "x", _Echo)


def _plugin_installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_example_plugin_is_discovered_through_entry_points() -> None:
    assert _plugin_installed("llmtune-example-plugin"), (
        "install tests/plugins/example_plugin (nox -s tests does it)"
    )
    metric = llmtune.get_metric("exact_match", ignore_case=True)
    result = metric.compute(["Kopi O", "teh"], [["kopi o", "black coffee"], "Teh C"])
    assert result.scores["exact_match"] == 0.5
    assert list(result.per_example["exact_match"]) == [1.0, 0.0]
    ratio = llmtune.get_metric("length_ratio").compute(["a b", "a"], ["a", "a b"])
    assert ratio.scores["length_ratio"] == pytest.approx(1.25)
    with pytest.raises(UnknownOptionError, match="ignorecase"):
        llmtune.get_metric("exact_match", ignorecase=True)
    rows = {(r.name, r.backend): r for r in llmtune.list_backends("metric")}
    assert rows[("exact_match", "example")].source.startswith("plugin llmtune-example-plugin")


def test_broken_plugin_is_reported_without_breaking_others() -> None:
    assert _plugin_installed("llmtune-broken-plugin"), "install tests/plugins/broken_plugin (nox -s tests does it)"
    reg = Registry()  # a fresh registry loads the entry points again, so the warning is observable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = {(r.name, r.backend): r for r in reg.list("metric")}
    assert any("llmtune-broken-plugin" in str(w.message) for w in caught)
    broken = rows[("broken", "plugin")]
    assert not broken.available and "broken on purpose" in (broken.reason or "")
    assert rows[("exact_match", "example")].available
    with pytest.raises(BackendUnavailableError, match="broken on purpose"):
        reg.create("metric", "broken")
    reg.create("metric", "exact_match")  # the healthy plugin still works


@pytest.mark.parametrize("call", [lambda: llmtune.get_trainer(123), lambda: llmtune.get_metric(None),
                                  lambda: llmtune.get_metric("rouge", backend=3), lambda: llmtune.get_task(["mmlu"])])
def test_a_name_that_is_not_a_string_is_a_typed_error(call) -> None:
    """``get_trainer(123)`` used to end in a raw ``TypeError: 'int' object is not iterable``."""
    from llmtune.core.errors import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match=r"(name|backend) must be a string, got .*known \w+s: "):
        call()
