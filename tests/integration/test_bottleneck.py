"""Bottleneck adapters (LLM-Adapters) on tiny Llama / Qwen2 / Mistral on CPU: step 0 = base, counts, save/load, nf4."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtune.core.errors import ConfigError, InvalidOptionError, MergeNotSupportedError  # noqa: E402
from llmtune.trainers.methods import bottleneck as bn  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIMS = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False}
FAMILIES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig}
VARIANTS = [("series", ("mlp",)), ("series", ("attn", "mlp")), ("parallel", ("attn",)), ("parallel", ("attn", "mlp"))]


def tiny(family: str = "llama", seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(FAMILIES[family](**DIMS)).eval()


@pytest.fixture(scope="module")
def tokens() -> Any:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: Any, tokens: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def randomize(model: Any, seed: int = 3) -> None:
    """Give every adapter non-zero weights (as training would), so outputs differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bn.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(("placement", "sites"), VARIANTS)
def test_step_zero_equals_base_and_count_is_the_formula(family: str, placement: str, sites: Any, tokens: Any) -> None:
    base = tiny(family)
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    opts = bn.BottleneckOptions(size=8, placement=placement, sites=sites)
    names = bn.inject_bottleneck(model, opts)
    assert len(names) == DIMS["num_hidden_layers"] * len(sites)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d, b, n_layers = DIMS["hidden_size"], 8, DIMS["num_hidden_layers"]
    assert trainable == bn.parameter_count(opts, d, n_layers) == n_layers * len(sites) * (2 * d * b + b + d)
    assert (logits(model, tokens) - logits(base, tokens)).abs().max().item() <= 1e-6
    randomize(model)
    assert (logits(model, tokens) - logits(base, tokens)).abs().max().item() > 1e-3  # the hooks do run
    bn.remove_bottleneck(model)
    assert torch.equal(logits(model, tokens), logits(base, tokens))


def test_no_bias_count() -> None:
    opts = bn.BottleneckOptions(size=16, sites=("attn", "mlp"), bias=False)
    model = tiny()
    bn.inject_bottleneck(model, opts)
    assert sum(p.numel() for p in bn.adapter_parameters(model)) == bn.parameter_count(opts, 64, 3) == 3 * 2 * 2 * 64 * 16


def test_series_and_parallel_follow_the_equations(tokens: Any) -> None:
    """One layer by hand: series y = F(x) + A(F(x)), parallel y = F(x) + A(x)."""
    for placement in bn.PLACEMENTS:
        model = tiny()
        bn.inject_bottleneck(model, bn.BottleneckOptions(size=4, placement=placement, sites=("mlp",)))
        randomize(model)
        mlp = model.model.layers[0].mlp
        x = torch.randn(2, 5, 64)
        adapter = mlp.bottleneck_adapter
        with torch.no_grad():
            f = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
            source = f if placement == "series" else x
            want = f + adapter.scaling * adapter.up(torch.tanh(adapter.down(source)))
            assert torch.allclose(mlp(x), want, atol=1e-6)


def test_save_load_identical_outputs_and_merge_refused(tokens: Any, tmp_path: Path) -> None:
    model = tiny()
    opts = bn.BottleneckOptions(size=8, placement="parallel", sites=("attn", "mlp"), non_linearity="gelu", scaling=2.0)
    bn.inject_bottleneck(model, opts)
    randomize(model)
    out = bn.save_bottleneck(model, tmp_path / "adapter")
    config = json.loads((out / bn.CONFIG_FILE).read_text())
    assert config["options"] == opts.to_dict() and config["trainable_parameters"] == bn.parameter_count(opts, 64, 3)
    assert (out / bn.WEIGHTS_FILE).is_file()
    fresh = bn.load_bottleneck(tiny(), out)
    assert torch.equal(logits(fresh, tokens), logits(model, tokens))
    with pytest.raises(MergeNotSupportedError, match="cannot be merged"):
        bn.merge_bottleneck(fresh)
    with pytest.raises(ConfigError, match="field 'modules'"):
        bn.load_bottleneck(tiny_with_layers(2), out)
    with pytest.raises(ConfigError, match="no such file"):
        bn.load_bottleneck(tiny(), tmp_path)


def tiny_with_layers(n: int) -> Any:
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**DIMS, "num_hidden_layers": n}))


def test_gradients_reach_only_the_adapters_and_training_lowers_the_loss(tokens: Any) -> None:
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    bn.inject_bottleneck(model, bn.BottleneckOptions(size=8, sites=("attn", "mlp")))
    params = bn.adapter_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is None for n, p in model.named_parameters() if "bottleneck_adapter" not in n)


def test_nf4_base_trains_and_round_trips(tokens: Any, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import llmtune

    model = llmtune.get_quantizer("nf4").quantize(tiny())
    reference = logits(model, tokens)
    for p in model.parameters():
        p.requires_grad_(False)
    bn.inject_bottleneck(model, bn.BottleneckOptions(size=8, sites=("attn", "mlp")))
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"  # the base layers are untouched
    assert (logits(model, tokens) - reference).abs().max().item() <= 1e-6
    params = bn.adapter_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    first = None
    for _ in range(5):
        loss = model(input_ids=tokens, labels=tokens).loss
        first = float(loss) if first is None else first
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(model(input_ids=tokens, labels=tokens).loss) < first
    bn.save_bottleneck(model, tmp_path / "a")
    again = bn.load_bottleneck(llmtune.get_quantizer("nf4").quantize(tiny()), tmp_path / "a")
    assert torch.equal(logits(again, tokens), logits(model, tokens))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": 0}, "size=0"), ({"placement": "sideways"}, "placement"), ({"sites": ()}, "sites"),
    ({"sites": ("attn", "attn")}, "twice"), ({"sites": ("ffn",)}, "sites"), ({"non_linearity": "swish"}, "non_linearity"),
    ({"scaling": 0.0}, "scaling"), ({"dropout": 1.0}, "dropout"), ({"bias": 1}, "bias"),
])
def test_bad_options_are_clear_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        bn.BottleneckOptions(**kwargs)


def test_not_a_decoder_model_and_double_injection_are_errors() -> None:
    with pytest.raises(ConfigError, match="hidden_size"):
        bn.inject_bottleneck(torch.nn.Linear(2, 2))
    model = tiny()
    bn.inject_bottleneck(model)
    with pytest.raises(ConfigError, match="already has"):
        bn.inject_bottleneck(model)


@pytest.mark.parametrize("act", bn.NON_LINEARITIES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_activations_per_token_and_the_memory_model(act: str, dropout: float) -> None:
    """What one adapter saves for backward, per token: 4·(d + k·b) bytes (k = 1 for tanh/relu, which keep only
    their output, 2 for gelu/silu) plus 4·d with dropout; llmtune.memory counts 4·(d + 2b) per site."""
    from llmtune.memory import ModelSpec
    from llmtune.memory.mechanisms import adapter_layer_bytes

    d, b, tokens = 64, 8, 10
    adapter = bn.BottleneckAdapter(d, bn.BottleneckOptions(size=b, non_linearity=act, dropout=dropout)).train()
    params = {p.untyped_storage().data_ptr() for p in adapter.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Any) -> Any:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(tokens, d, dtype=torch.bfloat16, requires_grad=True)  # a bf16 base: the fp32 copy is saved
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapter(x)
    k = 1 if act in ("tanh", "relu") else 2
    assert sum(saved.values()) / tokens == 4 * (d + k * b) + (4 * d if dropout else 0)
    spec = ModelSpec.from_preset("llama-3.2-1b")
    model_bytes = adapter_layer_bytes(spec, "bottleneck", 2, 4, bottleneck_size=b, sites=("mlp",))
    assert model_bytes == 4 * (spec.hidden_size + 2 * b)  # exact for gelu/silu without dropout, + 4b for tanh/relu
