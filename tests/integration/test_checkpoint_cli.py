"""Checkpoints and output directories through `llmtune train` as a user meets them: a planted pickle does
not run, another run's directory is refused (``--overwrite`` replaces it), a changed resume is refused
(``--allow-change`` permits it), each damaged file is named and the previous checkpoint resumes exactly, a
kill -9 during pruning loses nothing, and flipped bytes in a saved quantized model are detected."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from projects import make_project  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from llmtune.cli.main import app  # noqa: E402
from llmtune.core.errors import DamagedFileError, OutputDirError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TRAINER = ("trainer:\n  rank: 4\n  alpha: 8\n  lr: {lr}\n  batch_size: 4\n  max_steps: {steps}\n  warmup: 1\n"
           "  dropout: 0.1\n  progress: false\n  save_every: 1\n  keep_checkpoints: {keep}\n")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_config(root: Path, name: str = "train.yaml", *, lr: str = "2.0e-2", steps: int = 3, keep: int = 0,
                 out: str = "runs/a") -> Path:
    config = root / name
    config.write_text(f"model: base\ndata: data/train.jsonl\noutput_dir: {out}\n"
                      + TRAINER.format(lr=lr, steps=steps, keep=keep))
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    """A project (base model, data, config) with one finished 3-step run, a checkpoint after every step."""
    root = make_project(tmp_path_factory.mktemp("project"), tok)
    result = CliRunner().invoke(app, ["train", str(write_config(root))])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root


@pytest.fixture
def project(finished: Path, tmp_path: Path) -> Path:
    """A fresh copy of the finished project (each test damages its own)."""
    root = tmp_path / "p"
    shutil.copytree(finished, root)
    return root


def adapter_bytes(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def cli(*args: str, cwd: Path, script: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m llmtune.cli.main ARGS` in a real process (or ``script`` run with ARGS as sys.argv)."""
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "llmtune.cli.main", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_does_not_run_on_resume(project: Path) -> None:
    run = project / "runs" / "a"
    newest = run / "checkpoints" / "step-000003"
    marker = project / "pwned"
    blob = pickle.dumps({"state": {}, "param_groups": [], "x": Payload(marker)})
    pickle.loads(blob)
    assert marker.exists(), "the payload must be live for this test to mean anything"
    marker.unlink()
    (newest / "optimizer.safetensors").write_bytes(blob)           # the file the loader reads
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt"):       # the old layout's names, for good measure
        (newest / name).write_bytes(blob)
    expected = adapter_bytes(run)
    proc = cli("train", "train.yaml", "--resume", "auto", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    assert "skipped damaged checkpoint" in proc.stderr and "optimizer.safetensors" in proc.stderr
    assert adapter_bytes(run) == expected  # resumed from step 2, the same step 3 as before
    # an attacker who also rewrites the manifest gets the file read as safetensors, never unpickled
    newest = run / "checkpoints" / "step-000003"
    (newest / "optimizer.safetensors").write_bytes(blob)
    from llmtune.core.manifest import write_manifest

    write_manifest(newest)
    proc = cli("train", "train.yaml", "--resume", "auto", cwd=project)
    assert proc.returncode == 2 and not marker.exists()
    assert "optimizer.safetensors: not a readable llmtune state file" in proc.stderr.splitlines()[-1], proc.stderr


def test_another_run_in_the_same_directory_is_refused_until_overwrite(project: Path) -> None:
    run = project / "runs" / "a"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    other = write_config(project, "other.yaml", lr="1.0e-2")
    proc = cli("train", "other.yaml", cwd=project)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "holds another run" in errors[0] and "lr 0.02 -> 0.01" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr  # refused before the model loads
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing of run A touched
    # --resume auto does not silently continue the other run either
    resumed = CliRunner().invoke(app, ["train", str(other), "--resume", "auto"])
    assert isinstance(resumed.exception, OutputDirError) and "--allow-change lr" in str(resumed.exception)
    replaced = CliRunner().invoke(app, ["train", str(other), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output + repr(replaced.exception)
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["lr"] == 0.01
    states = [json.loads((p / "state.json").read_text()) for p in sorted((run / "checkpoints").iterdir())]
    assert [s["step"] for s in states] == [1, 2, 3] and {s["run"]["digest"] for s in states} == {record["digest"]}


def test_resume_with_a_changed_max_steps_needs_allow_change(project: Path) -> None:
    longer = write_config(project, "longer.yaml", steps=4)
    refused = CliRunner().invoke(app, ["train", str(longer), "--resume", "auto"])
    assert isinstance(refused.exception, OutputDirError)
    assert "max_steps 3 -> 4" in str(refused.exception) and "--allow-change max_steps" in str(refused.exception)
    allowed = CliRunner().invoke(app, ["train", str(longer), "--resume", "auto", "--allow-change", "max_steps"])
    assert allowed.exit_code == 0, allowed.output + repr(allowed.exception)
    log = [json.loads(line) for line in (project / "runs" / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def _truncate(path: Path, size: int | None = None) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2 if size is None else size)


DAMAGE = {
    "truncated adapter": (lambda c: _truncate(c / "adapter" / "adapter_model.safetensors"),
                          "adapter/adapter_model.safetensors: truncated"),
    "empty adapter": (lambda c: _truncate(c / "adapter" / "adapter_model.safetensors", 0),
                      "adapter/adapter_model.safetensors: empty"),
    "truncated optimizer": (lambda c: _truncate(c / "optimizer.safetensors"), "optimizer.safetensors: truncated"),
    "garbage state.json": (lambda c: (c / "state.json").write_text("{]garbage"), "state.json: "),
    "missing adapter/": (lambda c: shutil.rmtree(c / "adapter"), "adapter/: missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_damaged_file_is_named_and_the_previous_checkpoint_resumes(damage: str, project: Path) -> None:
    run = project / "runs" / "a"
    spoil, named = DAMAGE[damage]
    newest = run / "checkpoints" / "step-000003"
    spoil(newest)
    expected = adapter_bytes(run)
    result = CliRunner().invoke(app, ["train", str(project / "train.yaml"), "--resume", "auto"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "skipped damaged checkpoint" in result.output and named in result.output, result.output
    assert f"resumed from {run / 'checkpoints' / 'step-000002'}" in " ".join(result.output.split())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in log if r.get("event") == "checkpoint_skipped"]
    assert len(skipped) == 1 and skipped[0]["path"] == str(newest) and named in skipped[0]["reason"]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert adapter_bytes(run) == expected  # step 3 redone from step 2: bit-identical
    # naming the damaged checkpoint itself is an error that names the file (repaired above: damage again)
    spoil(newest)
    named_resume = CliRunner().invoke(app, ["train", str(project / "train.yaml"), "--resume", str(newest)])
    assert isinstance(named_resume.exception, DamagedFileError) and named in str(named_resume.exception)


_KILL_DURING_PRUNE = textwrap.dedent("""
    import os, shutil, signal, sys
    real = shutil.rmtree
    def rmtree_then_die(path, *args, **kwargs):
        if ".trash-step" in str(path):  # half the victim deleted, then kill -9
            os.remove(os.path.join(path, "state.json"))
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *args, **kwargs)
    shutil.rmtree = rmtree_then_die
    sys.argv = ["llmtune", *sys.argv[1:]]
    from llmtune.cli.main import main
    main()
""")


def test_kill_9_during_pruning_then_resume_is_exact(finished: Path, tmp_path: Path) -> None:
    root = tmp_path / "p"
    shutil.copytree(finished, root, ignore=shutil.ignore_patterns("runs"))
    write_config(root, keep=2, out="runs/b")
    proc = cli("train", "train.yaml", cwd=root, script=_KILL_DURING_PRUNE)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = root / "runs" / "b" / "checkpoints"
    # killed while pruning step 1 after step 3 was saved: step 2 and 3 complete, step 1 out of sight
    assert sorted(p.name for p in ckpts.iterdir()) == [".trash-step-000001", "step-000002", "step-000003"]
    resumed = cli("train", "train.yaml", "--resume", "auto", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000003"]
    log = [json.loads(line) for line in (root / "runs" / "b" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "recovered" and ".trash-step-000001" in r["path"] for r in log)
    assert adapter_bytes(root / "runs" / "b") == adapter_bytes(finished / "runs" / "a")


def _flip(path: Path, count: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    step = max(len(data) // (count + 1), 1)
    for i in range(count):
        data[(i + 1) * step % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_quantized_model_are_detected(finished: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    made = CliRunner().invoke(app, ["quantize", str(finished / "base"), "--method", "rtn", "--bits", "4",
                                    "--group-size", "32", "--out", str(out), "--quiet"])
    assert made.exit_code == 0, made.output + repr(made.exception)
    assert (out / "manifest.json").is_file()
    import llmtune

    llmtune.get_quantizer("rtn").load(out)  # intact: loads
    _flip(out / "model.safetensors")
    with pytest.raises(DamagedFileError, match=re.escape("model.safetensors: checksum mismatch")):
        llmtune.get_quantizer("rtn").load(out)
    gen = cli("generate", "What is Kopi O?", "--model", str(out), cwd=tmp_path)
    assert gen.returncode == 2 and "model.safetensors: checksum mismatch" in gen.stderr, gen.stderr[-3000:]


def test_flipped_bytes_in_a_saved_nf4_model_are_detected(finished: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    import llmtune

    quantizer = llmtune.get_quantizer("nf4")
    model = quantizer.quantize(AutoModelForCausalLM.from_pretrained(str(finished / "base")).to(torch.bfloat16))
    out = quantizer.save(model, tmp_path / "nf4")
    quantizer.load(out)
    _flip(out / "model.safetensors")
    with pytest.raises(DamagedFileError, match=re.escape("model.safetensors: checksum mismatch")):
        quantizer.load(out)
