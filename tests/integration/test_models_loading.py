"""The tiny-model factory and `load_model_and_tokenizer`: save/load round trip, offline errors, pretraining."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.core.errors import ConfigError, InvalidOptionError, LlmtuneError
from llmtune.models import loading
from llmtune.models.loading import load_model_and_tokenizer
from llmtune.models.tiny import (
    SPECIAL_TOKENS,
    build_tiny_model,
    pretrain,
    stop_token_ids,
    tiny_llama_config,
    train_tiny_tokenizer,
)

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")




@pytest.fixture(scope="module")
def saved(tok: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    model = build_tiny_model(tok, seed=3, **SMALL)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def test_tokenizer_is_deterministic_and_has_the_special_tokens(tok: Any) -> None:
    again = train_tiny_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    assert json.loads(again.backend_tokenizer.to_str()) == json.loads(tok.backend_tokenizer.to_str())
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    text = "Kopi O Kosong is black coffee, no sugar.\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # the words of the bundled text are merged
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tok) == tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>", "<|im_end|>"])
    small = train_tiny_tokenizer(["kopi teh milo"] * 3, vocab_size=300)
    assert len(small) <= 300
    with pytest.raises(InvalidOptionError, match="vocab_size"):
        train_tiny_tokenizer(vocab_size=100)
    with pytest.raises(InvalidOptionError, match="at least one text"):
        train_tiny_tokenizer([])


def test_model_is_deterministic_per_seed_and_leaves_global_rng(tok: Any) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(tok, seed=1, **SMALL)
    assert torch.equal(torch.rand(3), expected)
    b = build_tiny_model(tok, seed=1, **SMALL)
    c = build_tiny_model(tok, seed=2, **SMALL)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert a.config.vocab_size == len(tok) and a.config.pad_token_id == tok.pad_token_id
    assert a.generation_config.eos_token_id == stop_token_ids(tok)
    assert not a.training
    config = tiny_llama_config(100)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (128, 4, 2)
    assert build_tiny_model(100, num_hidden_layers=1).config.num_hidden_layers == 1
    with pytest.raises(InvalidOptionError, match="vocab_size"):
        tiny_llama_config(0)


def test_pretrain_lowers_the_loss_deterministically(tok: Any) -> None:
    texts = ["Kopi O Kosong is black coffee, no sugar. Teh C Siew Dai is tea with evaporated milk, less sweet."] * 8
    model = build_tiny_model(tok, seed=0, **SMALL)
    losses = pretrain(model, tok, texts, steps=40, lr=1e-2, seq_len=32, batch_size=4, seed=0)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0
    assert not model.training
    again = build_tiny_model(tok, seed=0, **SMALL)
    assert pretrain(again, tok, texts, steps=40, lr=1e-2, seq_len=32, batch_size=4, seed=0) == losses
    with pytest.raises(InvalidOptionError, match="steps"):
        pretrain(model, tok, texts, steps=0)
    with pytest.raises(InvalidOptionError, match="fewer than seq_len"):
        pretrain(model, tok, ["kopi"], seq_len=64)


def test_save_and_load_round_trip(saved: tuple[Path, Any], tok: Any) -> None:
    path, model = saved
    loaded, loaded_tok = load_model_and_tokenizer(path)
    ids = torch.tensor([tok("Kopi O Kosong is black coffee.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded_tok.pad_token_id == tok.pad_token_id
    assert not loaded.training
    loaded16, _ = load_model_and_tokenizer(str(path), dtype="bfloat16")
    assert next(loaded16.parameters()).dtype == torch.bfloat16
    with pytest.raises(InvalidOptionError, match="dtype"):
        load_model_and_tokenizer(path, dtype="fp8")


def test_options_reach_from_pretrained(saved: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: dict[str, Any] = {}

    def fake(source: str, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return build_tiny_model(512, **SMALL)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    marker = object()
    load_model_and_tokenizer(saved[0], quantization_config=marker, device_map="cpu")
    assert seen == {"local_files_only": True, "trust_remote_code": False, "quantization_config": marker,
                    "device_map": "cpu"}


def test_offline_hub_id_fails_fast_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    def no_probe(*args: Any, **kwargs: Any) -> bool:
        raise AssertionError("offline: the hub must not be contacted")

    monkeypatch.setattr(loading, "hub_reachable", no_probe)
    with pytest.raises(LlmtuneError, match=r"cannot load model 'llmtune-test/does-not-exist' from the local cache "
                                           r"\(offline: HF_HUB_OFFLINE"):
        load_model_and_tokenizer("llmtune-test/does-not-exist")


def test_unreachable_hub_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(LlmtuneError, match=r"the hub is unreachable.*Download it on a machine with access"):
        load_model_and_tokenizer("llmtune-test/does-not-exist")


def test_bad_local_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such model directory"):
        load_model_and_tokenizer(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no such model directory"):
        load_model_and_tokenizer("./no/such/dir")
    with pytest.raises(ConfigError, match=r"not a model directory \(no config.json\)"):
        load_model_and_tokenizer(tmp_path)


def test_remote_code_is_not_run_unless_asked(saved: tuple[Path, Any], tmp_path: Path) -> None:
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(saved[0], custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="llmtune_custom", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                         "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    with pytest.raises(LlmtuneError, match="trust_remote_code=True"):
        load_model_and_tokenizer(custom)
    with pytest.raises(InvalidOptionError, match="trust_remote_code"):
        load_model_and_tokenizer(custom, trust_remote_code="yes")  # type: ignore[arg-type]
