"""A `.gguf` file is a model wherever llmtune takes one: a tiny model written to GGUF by llmtune's own exporter is
read back (transformers' GGUF loader) through the API and every command (import-gguf, generate, eval, quantize,
train and train --check, merge, export, memory); unreadable architectures and tensor types are one typed error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

from typer.testing import CliRunner  # noqa: E402

from llmtune.cli.main import app  # noqa: E402
from llmtune.core.errors import ConfigError, UnsupportedModelError  # noqa: E402
from llmtune.models.loading import gguf_path, load_model_and_tokenizer  # noqa: E402

SMALL = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def made(tok: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama (a few pretraining steps) and its GGUF file (f16, ChatML template) in a folder of its own."""
    from llmtune.export.chat import jinja_template
    from llmtune.export.tensors import ModelTensors
    from llmtune.export.to_gguf import write_gguf
    from llmtune.models.tiny import build_tiny_model, pretrain

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_tiny_model(tok, seed=0, **SMALL)
        pretrain(model, tok, steps=30, seed=0)
    finally:
        torch.set_num_threads(before)
    model.eval()
    root = tmp_path_factory.mktemp("gguf")
    (root / "m").mkdir()
    path = root / "m" / "tiny.gguf"
    write_gguf(ModelTensors(model, model.config.to_dict()), tok, path, dtype="f16",
               chat_template=jinja_template("chatml", tok))
    return {"model": model, "path": path, "root": root}


def _ids(tok: Any, text: str = "Uncle Lim pours kopi o kosong") -> Any:
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_gguf_file_and_its_folder_load_with_tokenizer_and_template(made: dict[str, Any], tok: Any) -> None:
    for given in (made["path"], made["path"].parent, str(made["path"])):
        model, tokenizer = load_model_and_tokenizer(given)
        assert model.dtype == torch.float32 and not model.training
        assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
        ids = _ids(tok)
        assert tokenizer("Uncle Lim pours kopi o kosong", add_special_tokens=False)["input_ids"] == ids[0].tolist()
        assert "<|im_start|>" in tokenizer.chat_template
        with torch.no_grad():  # f16 weights: logits within f16 rounding of the original's
            assert torch.allclose(model(ids).logits, made["model"](ids).logits, atol=2e-2)
    bf16, _ = load_model_and_tokenizer(made["path"], dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


def test_two_gguf_files_in_a_folder_must_be_named(made: dict[str, Any], tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(made["path"].read_bytes())
    with pytest.raises(ConfigError, match=r"2 \.gguf files"):
        gguf_path(tmp_path)
    assert gguf_path(tmp_path / "a.gguf") == tmp_path / "a.gguf"


def _write(path: Path, arch: str, qtype: Any = None) -> None:
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    if qtype is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:  # raw bytes of a 2 x 32 tensor in ``qtype`` (one block per row)
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        writer.add_tensor("token_embd.weight", np.zeros((2, size), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unreadable_architecture_and_tensor_type_are_one_line_errors(tmp_path: Path) -> None:
    _write(tmp_path / "arch.gguf", "no-such-arch")
    with pytest.raises(UnsupportedModelError, match="architecture 'no-such-arch'") as err:
        load_model_and_tokenizer(tmp_path / "arch.gguf")
    assert "\n" not in str(err.value)
    _write(tmp_path / "type.gguf", "llama", gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(UnsupportedModelError, match=r"token_embd\.weight has GGUF type Q8_1"):
        load_model_and_tokenizer(tmp_path / "type.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UnsupportedModelError, match="not a readable GGUF file"):
        load_model_and_tokenizer(tmp_path / "junk.gguf")


def test_import_gguf_writes_a_model_directory(made: dict[str, Any], tok: Any, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    _cli("import-gguf", str(made["path"]), "--out", str(out))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "manifest.json"):
        assert (out / name).is_file(), name
    from_dir, tokenizer = load_model_and_tokenizer(out)
    from_gguf, _ = load_model_and_tokenizer(made["path"])
    ids = _ids(tok)
    with torch.no_grad():
        assert torch.equal(from_dir(ids).logits, from_gguf(ids).logits)
    assert "<|im_start|>" in tokenizer.chat_template
    refused = CliRunner().invoke(app, ["import-gguf", str(made["path"]), "--out", str(out)])
    assert isinstance(refused.exception, ConfigError) and "not empty" in str(refused.exception)
    inside = CliRunner().invoke(app, ["import-gguf", str(made["path"]), "--out", str(made["path"].parent)])
    assert isinstance(inside.exception, ConfigError) and "overwrite" in str(inside.exception)


def _answers(output: str) -> list[str]:
    return [json.loads(line)["answer"] for line in output.splitlines() if line.startswith('{"prompt"')]


def test_generate_greedy_and_seeded_sampling(made: dict[str, Any]) -> None:
    base = ["generate", "What is Kopi O?", "--model", str(made["path"]), "--template", "tokenizer",
            "--max-new-tokens", "8", "--json"]
    greedy = _answers(_cli(*base))
    assert greedy == _answers(_cli(*base)) and len(greedy) == 1
    sampled = [_answers(_cli(*base, "--temperature", "1.5", "--top-p", "0.95", "--top-k", "50", "--seed", str(s)))
               for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1]
    assert len({a[0] for a in sampled} | {greedy[0]}) > 1  # sampling differs from greedy or across seeds
    bad = CliRunner().invoke(app, [*base, "--top-p", "0.9"])
    assert bad.exit_code != 0 and "temperature" in str(bad.exception)


def _find(data: Any, key: str) -> Any:
    """The first value under ``key`` anywhere in nested dicts/lists (None when absent)."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        data = list(data.values())
    for item in data if isinstance(data, list) else []:
        found = _find(item, key)
        if found is not None:
            return found
    return None


def test_eval_perplexity_and_quantize_take_a_gguf(made: dict[str, Any], tok: Any, tmp_path: Path) -> None:
    import llmtune

    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "Uncle Lim pours kopi into a red cup."}) + "\n")
    out = _cli("eval", "--task", "perplexity", "--data", str(data), "--model", str(made["path"]), "--json")
    via_cli = json.loads(out[out.index("{"):])
    model, tokenizer = load_model_and_tokenizer(made["path"])
    direct = llmtune.get_task("perplexity", data=str(data)).evaluate(model, tokenizer)
    assert _find(via_cli, "token_perplexity") == pytest.approx(direct.metrics["token_perplexity"], rel=1e-6)
    _cli("quantize", str(made["path"]), "--out", str(tmp_path / "rtn"), "--method", "rtn", "--bits", "4",
         "--group-size", "32", "--quiet")
    qmodel, _ = load_model_and_tokenizer(tmp_path / "rtn")
    with torch.no_grad():
        assert torch.isfinite(qmodel(_ids(tok)).logits).all()


def test_train_check_merge_export_memory_from_a_gguf(made: dict[str, Any], tmp_path: Path) -> None:
    from llmtune.data import split_instructions
    from llmtune.trainers._inference import load_for_inference

    train, _ = split_instructions()
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train[:12]))
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {made['path']}\ndata: train.jsonl\noutput_dir: run\n"
                      "trainer:\n  rank: 4\n  alpha: 8\n  lr: 2.0e-2\n  batch_size: 4\n  max_steps: 2\n  warmup: 0\n"
                      "  template: tokenizer\n  eval_examples: 0\n  progress: false\n")
    check = json.loads(_cli("train", str(config), "--check", "--json"))
    assert check["ok"] and check["estimate"]["peak_tensor_bytes"] > 0
    assert "GGUF file tiny.gguf" in json.dumps(check)
    folder = tmp_path / "folder.yaml"  # the directory holding the file: the same model
    folder.write_text(config.read_text().replace(str(made["path"]), str(made["path"].parent)))
    assert json.loads(_cli("train", str(folder), "--check", "--json"))["ok"]
    _cli("train", str(config))
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(made["path"])
    _cli("merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    peft_model, tok2 = load_for_inference(None, adapter)
    merged, _ = load_model_and_tokenizer(tmp_path / "merged")
    ids = _ids(tok2)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model(ids).logits, atol=1e-5)
    _cli("export", str(made["path"]), "--out", str(tmp_path / "hf"), "--format", "hf", "--dtype", "f32")
    exported, _ = load_model_and_tokenizer(tmp_path / "hf")
    base, _ = load_model_and_tokenizer(made["path"])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, base(ids).logits)
    memory = _cli("memory", str(made["path"]), "--json")
    assert json.loads(memory[memory.index("{"):])


def test_qlora_from_a_gguf_quantizes_the_loaded_model(made: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import llmtune
    from llmtune.data import split_instructions

    train, _ = split_instructions()
    trainer = llmtune.get_trainer("lora", quantizer=llmtune.get_quantizer("nf4", compute_dtype="float32"), rank=4,
                                  alpha=8, lr=2e-2, batch_size=4, max_steps=1, warmup=0, eval_examples=0,
                                  progress=False, template="tokenizer")
    result = trainer.train(str(made["path"]), train[:8], output_dir=tmp_path / "run")
    assert result.adapter_dir is not None and len(result.history) >= 1
