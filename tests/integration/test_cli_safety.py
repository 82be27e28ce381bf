"""The CLI never destroys its inputs and reports every failure in one line (``--debug`` shows the traceback).

Most cases call ``llmtune.cli.main.main(argv)`` in-process (the same code the console script runs); the ones
users meet first (quantize/merge into the source, a traceback only with --debug, generate on a GPTQ
checkpoint) run ``python -m llmtune.cli.main`` in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmtune.cli.main import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a tiny model, a fake adapter recording it as base, and files of every bad kind."""
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tok = train_tiny_tokenizer()
    build_tiny_model(tok, seed=0, **SMALL).save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": str(root / "base")}))
    (root / "adir").mkdir()
    (root / "a-file").write_text("x\n")
    (root / "ok.txt").write_text("kopi o is black coffee\n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "latin1.yaml").write_bytes("model: base\ndata: caf\xe9.jsonl\n".encode("latin-1"))
    (root / "data-is-a-dir.yaml").write_text("model: base\ndata: adir\noutput_dir: runs/d\n")
    _bad_task_data(root)
    custom = root / "custom"
    custom.mkdir()
    config = json.loads((root / "base" / "config.json").read_text())
    config.update(model_type="xcustom", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                  "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (custom / name).write_bytes((root / "base" / name).read_bytes())
    return root


def _bad_task_data(root: Path) -> None:
    """Task data whose fields are all present but whose values are wrong, a run config, and a data folder."""
    hs = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["w", "x", "y", "z"], "label": 1}
    rows = {"hs-label9.jsonl": {**hs, "label": 9}, "hs-one-string.jsonl": {**hs, "endings": "wxyz"},
            "boolq-string.jsonl": {"question": "q", "passage": "p", "answer": "false"},
            "mmlu-9.jsonl": {"question": "q", "choices": ["w", "x", "y", "z"], "answer": 9},
            "mmlu-minus1.jsonl": {"question": "q", "choices": ["w", "x", "y", "z"], "answer": -1}}
    for name, row in rows.items():
        (root / name).write_text(json.dumps(row) + "\n")
    (root / "squad-no-qas.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c"}]}]}))
    (root / "empty.txt").write_text("")
    (root / "evaldata").mkdir()
    (root / "evaldata" / "hellaswag.jsonl").write_text(json.dumps(hs) + "\n")
    (root / "sft.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    run = "model: base\ndata: sft.jsonl\noutput_dir: runs/safety\ntrainer:\n  template: chatml\n"
    (root / "run.yaml").write_text(run)
    (root / "seed.yaml").write_text(run + "  seed: 100000000000000000000\n")
    (root / "threads.yaml").write_text(run + "  num_threads: 100000\n")


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of the CLI run in-process."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
    return code, capsys.readouterr().err


# argv (paths relative to the work folder) -> what the one error line must say
CATALOGUE = [
    (["eval", "-m", "rouge", "-p", "adir", "-r", "ok.txt"], "adir: is a directory, not a file"),
    (["eval", "-m", "rouge", "-p", "ok.txt", "-r", "latin1.txt"], "latin1.txt: not UTF-8 text"),
    (["memory", "base/model.safetensors"], "base/model.safetensors: not a config.json"),
    (["memory", "llama-3.1-8b", "--plot", "x.jpgx"], "unknown image format 'jpgx'"),
    (["memory", "llama-3.1-8b", "--plot", "nodir/x.png"], "folder nodir does not exist"),
    (["memory", "llama-3.1-8b", "--plot", "adir"], "--plot adir is a directory"),
    (["quantize", "base", "--method", "gptq", "--calibration", "latin1.txt", "--out", "q"],
     "calibration file latin1.txt: not UTF-8 text"),
    (["quantize", "base", "--method", "gptq", "--calibration", "adir", "--out", "q"],
     "calibration file adir is a directory"),
    (["quantize", "base/config.json", "--method", "rtn", "--out", "q"], "is a file, not a model directory"),
    (["quantize", "base", "--method", "nf4", "--out", "base"], "--out base is the input base"),
    (["quantize", "base", "--method", "nf4", "--out", "."], "contains the input base"),
    (["quantize", "base", "--method", "nf4", "--out", "a-file"], "--out a-file exists and is not a directory"),
    (["quantize", "custom", "--method", "rtn", "--out", "q"], "custom contains custom code"),
    (["generate", "hi", "--model", "custom"], "contains custom code"),
    (["generate", "hi", "--model", "a-file"], "a-file: is a file, not a model directory"),
    (["train", "latin1.yaml"], "config file latin1.yaml: not UTF-8 text"),
    (["train", "adir"], "config file adir is a directory"),
    (["merge", "--adapter", "adapter", "--out", "a-file"], "--out a-file exists and is not a directory"),
    (["merge", "--adapter", "adapter", "--out", "base"], "is the input"),
    (["demo", "--out", "a-file"], "--out a-file exists and is not a directory"),
    (["train", "data-is-a-dir.yaml"], "adir: is a directory, not a data file"),
    # task data: values checked, not only presence (each was scored as acc 0, exit 0)
    (["eval", "--task", "hellaswag", "--data", "hs-label9.jsonl", "--model", "base"],
     "hs-label9.jsonl:1: field 'label': 9 is not an index into 4 endings"),
    (["eval", "--task", "hellaswag", "--data", "hs-one-string.jsonl", "--model", "base"],
     "hs-one-string.jsonl:1: field 'endings': expected a list of endings, got one string"),
    (["eval", "--task", "boolq", "--data", "boolq-string.jsonl", "--model", "base"],
     "boolq-string.jsonl:1: field 'answer': expected true or false, got \"false\""),
    (["eval", "--task", "mmlu", "--data", "mmlu-9.jsonl", "--model", "base"],
     "mmlu-9.jsonl:1: field 'answer': 9 is not an index into 4 choices"),
    (["eval", "--task", "mmlu", "--data", "mmlu-minus1.jsonl", "--model", "base"],
     "mmlu-minus1.jsonl:1: field 'answer': -1 is not an index into 4 choices"),
    (["eval", "--task", "squad", "--data", "squad-no-qas.json", "--model", "base"],
     "squad-no-qas.json: data[0].paragraphs[0]: no field 'qas'"),
    (["eval", "--task", "perplexity", "--data", "empty.txt", "--model", "base"], "empty.txt: empty: there is no text"),
    # outputs never overlap inputs
    (["eval", "--task", "hellaswag", "--data", "evaldata/hellaswag.jsonl", "--model", "base", "--output", "evaldata"],
     "--output evaldata contains the input evaldata/hellaswag.jsonl"),
    (["quantize", "base", "--method", "nf4", "--out", "base/quantized"],
     "--out base/quantized lies inside the input base"),
    # options never vanish, bounds are checked
    (["train", "run.yaml", "--resume", "auto", "--allow-change", "no_such_field"],
     "allow_changes 'no_such_field' (CLI --allow-change no_such_field) is not a setting of this run"),
    (["train", "run.yaml", "--resume", "auto", "--allow-change", "rank"], "rank shapes the trained weights"),
    (["train", "seed.yaml", "--check"], "option seed=100000000000000000000 must be at most 4294967295"),
    (["train", "threads.yaml", "--check"], "option num_threads=100000 must be at most 1024"),
]


@pytest.mark.parametrize(("argv", "expected"), CATALOGUE, ids=[" ".join(a) for a, _ in CATALOGUE])
def test_each_bad_input_is_one_line_naming_it(work, capsys, monkeypatch, argv, expected) -> None:
    monkeypatch.chdir(work)
    before = tree_hash(work)
    code, err = run_main(argv, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], err
    assert "Traceback" not in err
    assert tree_hash(work) == before  # nothing written, nothing lost


def test_an_unexpected_failure_is_one_line_and_debug_shows_it(work, capsys, monkeypatch) -> None:
    import llmtune.cli.eval as cli_eval

    def broken(*args, **kwargs):
        raise RuntimeError("something\nunforeseen")

    monkeypatch.setattr(cli_eval, "load_pairs", broken)
    monkeypatch.chdir(work)
    code, err = run_main(["eval", "-m", "rouge", "-p", "ok.txt", "-r", "ok.txt"], capsys)
    assert code == 1
    assert err.strip().splitlines() == ["error: RuntimeError: something unforeseen (rerun with --debug for the "
                                        "traceback)"]
    with pytest.raises(RuntimeError, match="unforeseen"):
        main(["--debug", "eval", "-m", "rouge", "-p", "ok.txt", "-r", "ok.txt"])
    monkeypatch.setenv("LLMTUNE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="unforeseen"):
        main(["eval", "-m", "rouge", "-p", "ok.txt", "-r", "ok.txt"])


@pytest.mark.parametrize(("raised", "says"), [
    (KeyboardInterrupt(), "before a checkpoint was saved"),
    (KeyboardInterrupt("interrupted after step 3; checkpoint runs/x/checkpoint-3"), "checkpoint runs/x/checkpoint-3"),
])
def test_ctrl_c_says_a_checkpoint_was_saved_only_when_one_was(work, capsys, monkeypatch, raised, says) -> None:
    import llmtune.trainers._config as config_module

    (work / "data.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    (work / "train.yaml").write_text("model: base\ndata: data.jsonl\noutput_dir: runs/x\n")

    def interrupted(*args, **kwargs):
        raise raised

    monkeypatch.setattr(config_module, "run", interrupted)
    monkeypatch.chdir(work)
    code, err = run_main(["train", "train.yaml"], capsys)
    assert code == 130 and says in err
    if not str(raised):
        assert "checkpoint saved" not in err


def test_a_read_only_output_is_refused_before_the_model_loads(work, capsys, monkeypatch) -> None:
    """As root every directory is writable, so the permission answer is simulated (os.access says no)."""
    import llmtune.core.paths as paths
    import llmtune.quantizers.directory as calibration

    def no_write(path, mode):
        return not mode & os.W_OK

    def must_not_load(src):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(paths.os, "access", no_write)
    monkeypatch.setattr(calibration, "_load_local", must_not_load)
    monkeypatch.chdir(work)
    code, err = run_main(["quantize", "base", "--method", "nf4", "--out", "adir/q"], capsys)
    assert code == 2 and "is not writable (permission denied)" in err and "Traceback" not in err


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "llmtune.cli.main", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600, check=False)


def test_quantize_and_merge_into_their_source_are_refused(work) -> None:
    before = tree_hash(work / "base")
    for args in (["quantize", "base", "--method", "nf4", "--out", "base"],
                 ["quantize", "base", "--method", "rtn", "--out", "./base/../base"],
                 ["merge", "--adapter", "adapter", "--out", "base"],
                 ["merge", "--adapter", "adapter", "--out", "adapter"]):
        done = cli(*args, cwd=work)
        assert done.returncode == 2, done.stderr
        assert "would overwrite it" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert tree_hash(work / "base") == before


def test_debug_flag_shows_the_traceback(work) -> None:
    plain = cli("eval", "-m", "rouge", "-p", "adir", "-r", "ok.txt", cwd=work)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = cli("eval", "-m", "rouge", "-p", "adir", "-r", "ok.txt", "--debug", cwd=work)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "is a directory" in debug.stderr


def test_generate_runs_on_a_gptq_checkpoint_llmtune_quantize_wrote(work, tmp_path) -> None:
    (tmp_path / "cal.txt").write_text("Kopi O is black coffee with sugar. Teh tarik is pulled tea. " * 40)
    done = cli("quantize", str(work / "base"), "--method", "gptq", "--calibration", str(tmp_path / "cal.txt"),
               "--group-size", "32", "--samples", "4", "--seq-len", "32", "--out", str(tmp_path / "q"), "--json",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["method"] == "gptq"  # stdout is only the JSON line (no progress bar in it)
    gen = cli("generate", "What is Kopi O?", "--model", str(tmp_path / "q"), "--max-new-tokens", "4", "--json",
              cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    answer = json.loads(gen.stdout.strip().splitlines()[-1])
    assert answer["prompt"] == "What is Kopi O?" and isinstance(answer["answer"], str)
    # quiet by default: no weight-loading bars, no bitsandbytes kernels advice
    assert "Loading weights" not in gen.stderr and "kernels-community" not in gen.stderr
    from llmtune.models.loading import load_model_and_tokenizer
    from llmtune.quantizers.gptq.quant_linear import QuantLinear

    model, _ = load_model_and_tokenizer(tmp_path / "q")
    assert any(isinstance(m, QuantLinear) for m in model.modules())


def test_generate_runs_on_an_nf4_model_llmtune_quantize_wrote(work, tmp_path) -> None:
    """hidden 32 < blocksize 64: rows are not whole blocks, the shape AVX-512 CPUs get wrong (or crash on)."""
    pytest.importorskip("bitsandbytes")
    done = cli("quantize", str(work / "base"), "--method", "nf4", "--out", str(tmp_path / "q"), "--json",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    gen = cli("generate", "What is Kopi O?", "--model", str(tmp_path / "q"), "--max-new-tokens", "4", "--json",
              cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout.strip().splitlines()[-1])["prompt"] == "What is Kopi O?"
    assert "kernels-community" not in gen.stderr and "Traceback" not in gen.stderr
