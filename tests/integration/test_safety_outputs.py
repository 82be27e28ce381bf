"""Outputs under concurrency, kills, full disks and SIGTERM, through the CLI in real processes (issue 24, part B):
two `train` runs on one output_dir (one wins, the other is refused at once naming the owner), a resume onto a
base whose weights changed (same shapes and sizes) is refused, a kill -9 or SIGTERM in the middle of
`export --overwrite` leaves the previous export whole, a full disk (RLIMIT_FSIZE) is one line naming the path
with nothing complete-looking left, and SIGTERM saves the same checkpoint as Ctrl-C and exits 143."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("gguf")

from projects import SMALL, make_project  # noqa: E402

from llmtune.core.manifest import manifest_problems, verify_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = ("model: base\ndata: data/train.jsonl\noutput_dir: {out}\ntrainer:\n  rank: 4\n  alpha: 8\n  lr: 2.0e-2\n"
          "  batch_size: 4\n  max_steps: 3\n  warmup: 1\n  dropout: 0.1\n  progress: false\n  save_every: 1\n"
          "  template: llama3\n")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_config(root: Path, out: str) -> str:
    name = f"{out.replace('/', '-')}.yaml"
    (root / name).write_text(CONFIG.format(out=out))
    return name


def cli(*args: str, cwd: Path, script: str | None = None, fsize: int | None = None,
        wait: bool = True) -> Any:
    """``llmtune ARGS`` in a real process (``script``: a wrapper that patches something, then runs the CLI);
    ``fsize``: a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so writes fail with EFBIG as on a full disk."""
    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    prelude = "import sys\nsys.argv = ['llmtune', *sys.argv[1:]]\n"
    runner = "from llmtune.cli.main import main\nmain()\n"
    code = prelude + textwrap.dedent(script or "") + runner
    cmd = [sys.executable, "-c", code, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    kwargs: dict[str, Any] = {"cwd": cwd, "env": env, "text": True, "preexec_fn": limit if fsize else None}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    return subprocess.run(cmd, capture_output=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    """A project (base model, data) with one finished 3-step run in runs/a (a checkpoint after every step) and
    its GGUF export in exports/a."""
    root = make_project(tmp_path_factory.mktemp("project"), tok)
    proc = cli("train", write_config(root, "runs/a"), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli("export", "runs/a", "--out", "exports/a", "--quiet", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture
def project(finished: Path, tmp_path: Path) -> Path:
    root = tmp_path / "p"
    shutil.copytree(finished, root)
    return root


def adapter_bytes(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def last_line(proc: Any) -> str:
    return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


# ---------------------------------------------------------------------------------------- one run per directory
_WAIT_AT_STEP_1 = """
    import os, pathlib, time
    from llmtune.trainers.callbacks import JsonlLogger
    real = JsonlLogger.on_step_end
    def on_step_end(self, state, record):
        real(self, state, record)
        if state.step == 1:   # hold the directory until the test lets go
            marker = pathlib.Path("go-on")
            deadline = time.time() + 300
            while not marker.exists() and time.time() < deadline:
                time.sleep(0.05)
    JsonlLogger.on_step_end = on_step_end
"""


def test_two_runs_on_one_output_dir_one_wins_the_other_is_refused_at_once(project: Path, finished: Path) -> None:
    config = write_config(project, "runs/c")
    first = cli("train", config, cwd=project, script=_WAIT_AT_STEP_1, wait=False)
    try:
        log = project / "runs" / "c" / "log.jsonl"
        for _ in range(6000):   # until the first run has logged step 1 (it then waits for go-on)
            if (log.is_file() and '"step": 1' in log.read_text()) or first.poll() is not None:
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-3000:]
        second = cli("train", config, cwd=project)
    finally:
        (project / "go-on").touch()
        _out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    message = last_line(second)
    assert "runs/c is in use by another llmtune process" in message and f"pid {first.pid}" in message, message
    run = project / "runs" / "c"
    verify_manifest(run / "adapter")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert adapter_bytes(run) == adapter_bytes(finished / "runs" / "a")   # the survivor's own, complete result
    assert not (run / ".llmtune.lock").exists()


def test_a_stale_lock_of_a_dead_run_is_taken_over_and_said_so(project: Path) -> None:
    run = project / "runs" / "d"
    run.mkdir(parents=True)
    (run / ".llmtune.lock").write_text(json.dumps({"pid": 2**22 + 17, "host": "gone"}))
    proc = cli("train", write_config(project, "runs/d"), cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"took over runs/d/.llmtune.lock: a stale lock of pid {2**22 + 17} on host gone" in proc.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "lock_taken_over" and "pid 4194321" in r["reason"] for r in log)


# ---------------------------------------------------------------------------------------- resume checks content
def test_resume_onto_changed_base_weights_of_the_same_size_is_refused(project: Path, tok: Any) -> None:
    from llmtune.models.tiny import build_tiny_model

    weights = project / "base" / "model.safetensors"
    size = weights.stat().st_size
    build_tiny_model(tok, seed=1, **SMALL).save_pretrained(str(project / "base"))  # same shapes, new values
    assert weights.stat().st_size == size
    proc = cli("train", "runs-a.yaml", "--resume", "auto", cwd=project)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot resume" in last_line(proc) and "model 'local:" in last_line(proc), proc.stderr[-2000:]
    assert "weight contents differ" in last_line(proc)


def test_an_unchanged_base_resumes_exactly_and_is_hashed_once(project: Path, finished: Path) -> None:
    run = project / "runs" / "a"
    shutil.rmtree(run / "checkpoints" / "step-000003")
    proc = cli("train", "runs-a.yaml", "--resume", "auto", cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert adapter_bytes(run) == adapter_bytes(finished / "runs" / "a")
    cache = json.loads((Path(os.environ["LLMTUNE_CACHE_DIR"]) / "file-hashes.json").read_text())
    assert str((project / "base" / "model.safetensors").resolve()) in cache


# ---------------------------------------------------------------------------------------- export: kill, SIGTERM
_STOP_WHILE_WRITING_GGUF = """
    import os, signal
    import llmtune.export.to_gguf as to_gguf
    real = to_gguf.write_gguf
    def write_gguf(model, tokenizer, path, **kw):
        out = real(model, tokenizer, path, **kw)
        with open(path, "r+b") as fh:
            fh.truncate(24)          # the file half-written when the signal lands
        os.kill(os.getpid(), signal.{sig})
        return out
    to_gguf.write_gguf = write_gguf
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_stopped_export_overwrite_leaves_the_previous_export_whole(project: Path, sig: str) -> None:
    out = project / "exports" / "a"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = cli("export", "runs/a", "--out", "exports/a", "--overwrite", "--quiet", cwd=project,
               script=_STOP_WHILE_WRITING_GGUF.format(sig=sig))
    assert proc.returncode == (-signal.SIGKILL if sig == "SIGKILL" else 143), proc.stderr[-3000:]
    assert manifest_problems(out) == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    leftovers = sorted(p.name for p in out.parent.iterdir() if p.name != "a")
    if sig == "SIGTERM":   # cleaned up on the way out
        assert leftovers == [], leftovers
        return
    assert all(name.startswith(".") for name in leftovers), leftovers   # kill -9: only hidden leftovers
    again = cli("export", "runs/a", "--out", "exports/a", "--overwrite", "--quiet", cwd=project)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["a"]
    assert manifest_problems(out) == []


# ---------------------------------------------------------------------------------------- a full disk
def _assert_full_disk(proc: Any, path: str) -> None:
    """One line naming ``path`` (as the user gave it) and saying what happened."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith(f"error: {path}: no space left on device"), proc.stderr[-3000:]


def test_a_full_disk_during_export_names_the_path_and_leaves_nothing(project: Path) -> None:
    proc = cli("export", "runs/a", "--out", "exports/full", "--quiet", cwd=project, fsize=20_000)
    _assert_full_disk(proc, str(project / "exports" / "full"))
    assert sorted(p.name for p in (project / "exports").iterdir()) == ["a"]


def test_a_full_disk_during_quantize_names_the_path_and_leaves_nothing(project: Path) -> None:
    proc = cli("quantize", "base", "--method", "rtn", "--group-size", "16", "--out", "quantized", "--quiet",
               cwd=project, fsize=50_000)
    _assert_full_disk(proc, "quantized")
    assert not any(p.name.endswith("quantized") for p in project.iterdir())


def test_a_full_disk_during_a_checkpoint_names_it_and_leaves_no_checkpoint(project: Path) -> None:
    proc = cli("train", write_config(project, "runs/full"), cwd=project, fsize=20_000)
    _assert_full_disk(proc, "runs/full/checkpoints/step-000001")
    assert not (project / "runs" / "full" / "checkpoints").exists() or not any(
        (project / "runs" / "full" / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------- SIGTERM is Ctrl-C
_SIGNAL_AFTER_STEP_2 = """
    import os, signal
    from llmtune.trainers.callbacks import JsonlLogger
    real = JsonlLogger.on_step_end
    def on_step_end(self, state, record):
        real(self, state, record)
        if state.step == 2:
            os.kill(os.getpid(), signal.{sig})
    JsonlLogger.on_step_end = on_step_end
"""


def test_sigterm_saves_the_checkpoint_ctrl_c_saves_and_exits_143(project: Path, finished: Path) -> None:
    saved = {}
    for sig, code in (("SIGINT", 130), ("SIGTERM", 143)):
        out = f"runs/{sig.lower()}"
        proc = cli("train", write_config(project, out), cwd=project, script=_SIGNAL_AFTER_STEP_2.format(sig=sig))
        assert proc.returncode == code, proc.stderr[-3000:]
        assert "after step 2; checkpoint" in proc.stderr and "rerun with --resume auto" in proc.stderr
        step = project / out / "checkpoints" / "step-000002"
        verify_manifest(step)
        files = json.loads((step / "manifest.json").read_text())["files"]
        saved[sig] = {k: v["sha256"] for k, v in files.items() if k.endswith(".safetensors")}
        resumed = cli("train", write_config(project, out), "--resume", "auto", cwd=project)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert adapter_bytes(project / out) == adapter_bytes(finished / "runs" / "a")
    assert len(saved["SIGINT"]) == 4   # adapter weights, optimizer, scheduler, RNG states: the same files
    assert saved["SIGTERM"] == saved["SIGINT"]
