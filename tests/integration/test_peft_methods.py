"""PEFT's other methods through llmtune's typed options, on a tiny Llama on CPU."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from llmtune.core.errors import ConfigError, GPURequiredError, InvalidOptionError  # noqa: E402
from llmtune.trainers.methods import peft_methods as pm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIMS = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": False}


def tiny(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**DIMS)).eval()


@pytest.fixture(scope="module")
def tokens() -> Any:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: Any, tokens: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("rslora", [True, False])
def test_rslora_scaling_in_every_wrapped_module(rslora: bool, tokens: Any) -> None:
    opts = pm.LoraVariantOptions(rank=4, alpha=8, rslora=rslora, dropout=0.0)
    model = peft.get_peft_model(tiny(), opts.peft_config())
    layers = lora_layers(model)
    assert len(layers) == DIMS["num_hidden_layers"] * 7
    want = 8 / math.sqrt(4) if rslora else 8 / 4
    assert opts.scaling == want
    assert all(layer.scaling["default"] == pytest.approx(want) for layer in layers)
    # and the forward uses it: W x + s B A x on one module, by hand
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(q.lora_B["default"].weight)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want_out = q.base_layer(x) + want * q.lora_B["default"](q.lora_A["default"](x))
        assert torch.allclose(q(x), want_out, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_step_zero_equal_the_base(init: str, tokens: Any) -> None:
    base = tiny()
    model = peft.get_peft_model(copy.deepcopy(base), pm.LoraVariantOptions(rank=4, init=init, dropout=0.0).peft_config())
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_B["default"].weight.abs().sum() > 0  # not LoRA's zero init: the adapter holds W's top directions
    assert not torch.equal(q.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)  # residual in the base
    err = (logits(model, tokens) - logits(base, tokens)).abs().max().item()
    assert err <= 1e-5, err


def test_pissa_fast_svd_config() -> None:
    assert pm.LoraVariantOptions(init="pissa", pissa_niter=4).peft_config().init_lora_weights == "pissa_niter_4"
    with pytest.raises(InvalidOptionError, match="pissa_niter"):
        pm.LoraVariantOptions(pissa_niter=4)


def test_loftq_without_a_gpu_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("has a GPU: tests/gpu/test_loftq_cuda.py covers LoftQ")
    with pytest.raises(GPURequiredError, match="CUDA"):
        pm.LoraVariantOptions(init="loftq").peft_config()


def test_quantized_base_rejects_pissa() -> None:
    with pytest.raises(ConfigError, match="loftq"):
        pm.check_quantized_base("pissa", quantized=True)
    pm.check_quantized_base("loftq", quantized=True)


def test_loraplus_groups_give_b_the_higher_learning_rate() -> None:
    model = peft.get_peft_model(tiny(), pm.LoraVariantOptions(rank=4).peft_config())
    opt = pm.loraplus_optimizer(model, lr=1e-4, ratio=16)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(lr_of[id(p)] == pytest.approx(16e-4 if "lora_B" in n else 1e-4) for n, p in names.items())
    with pytest.raises(InvalidOptionError, match="loraplus_ratio"):
        pm.loraplus_optimizer(model, lr=1e-4, ratio=0.5)


def _train(model: Any, tokens: Any, steps: int = 6, lr: float = 3e-2) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    out = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    model.eval()
    return out


@pytest.mark.parametrize("options", [pm.IA3Options(), pm.PrefixTuningOptions(num_virtual_tokens=4),
                                     pm.PrefixTuningOptions(num_virtual_tokens=4, projection=True, projection_hidden=16)])
def test_ia3_and_prefix_tuning_train_and_reload(options: Any, tokens: Any, tmp_path: Path) -> None:
    model = peft.get_peft_model(tiny(), options.peft_config())
    losses = _train(model, tokens)
    assert losses[-1] < losses[0]
    trained = logits(model, tokens)
    model.save_pretrained(str(tmp_path))
    again = peft.PeftModel.from_pretrained(tiny(), str(tmp_path)).eval()
    assert torch.allclose(logits(again, tokens), trained, atol=1e-6)
    assert not torch.allclose(logits(tiny(), tokens), trained, atol=1e-4)


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (pm.LoraVariantOptions, {"rank": 0}, "rank"), (pm.LoraVariantOptions, {"init": "svd"}, "init"),
    (pm.LoraVariantOptions, {"rslora": "yes"}, "rslora"), (pm.LoraVariantOptions, {"loftq_bits": 3}, "loftq_bits"),
    (pm.LoraVariantOptions, {"init": "loftq", "dora": True}, "dora"), (pm.LoraVariantOptions, {"targets": []}, "targets"),
    (pm.IA3Options, {"targets": ()}, "targets"), (pm.IA3Options, {"feedforward": ("gate_proj",)}, "not in targets"),
    (pm.PrefixTuningOptions, {"num_virtual_tokens": 0}, "num_virtual_tokens"),
])
def test_bad_options_are_clear_errors(cls: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidOptionError, match=match):
        cls(**kwargs)
