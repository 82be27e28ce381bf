"""`llmtune.trainers._checkpoint` and `llmtune.core.manifest`: state without pickle, manifests, one run per
output directory, pruning, and every crash path of commit / prune (a real kill -9 in a subprocess)."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from llmtune.core.errors import ConfigError, DamagedFileError, LlmtuneError, OutputDirError  # noqa: E402
from llmtune.core.manifest import manifest_problems, verify_manifest, write_manifest  # noqa: E402
from llmtune.trainers import _checkpoint as ckpt  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FP = ckpt.Fingerprint(config={"lr": 0.02, "max_steps": 4, "rank": 4}, data="d0")


class Payload:
    """A pickle that runs code when unpickled: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def real_optimizer_state() -> tuple[Any, Any]:
    """An AdamW + cosine schedule after three steps (so every state field is populated)."""
    from transformers import get_scheduler

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=0.1)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    for _ in range(3):
        lin(torch.randn(4, 5)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt, sched


def make_checkpoint(out: Path, step: int, fp: ckpt.Fingerprint = FP, rng: bool = True) -> Path:
    """A complete checkpoint as the trainer writes one (the adapter is a small safetensors file)."""
    from safetensors.torch import save_file

    opt, sched = real_optimizer_state()
    final = ckpt.step_dir(out, step)
    tmp = ckpt.begin(final)
    (tmp / "adapter").mkdir()
    save_file({"lora_A": torch.full((4, 8), float(step))}, str(tmp / "adapter" / "adapter_model.safetensors"))
    (tmp / "adapter" / "adapter_config.json").write_text("{}\n")
    ckpt.save_state(tmp, "optimizer", opt.state_dict())
    ckpt.save_state(tmp, "scheduler", sched.state_dict())
    if rng:
        ckpt.save_rng(tmp, 0)
    return ckpt.commit(final, {"step": step, "run": fp.to_dict(), "history": []})


# ------------------------------------------------------------------------------------------- state, no pickle
def test_optimizer_scheduler_and_rng_state_round_trip_exactly(tmp_path: Path) -> None:
    opt, sched = real_optimizer_state()
    ckpt.save_state(tmp_path, "optimizer", opt.state_dict())
    ckpt.save_state(tmp_path, "scheduler", sched.state_dict())
    back = ckpt.load_state(tmp_path, "optimizer")
    want = opt.state_dict()
    assert back["param_groups"] == want["param_groups"]
    assert isinstance(back["param_groups"][0]["betas"], tuple)  # tuples stay tuples
    for idx, entry in want["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["state"][idx][key], value), key
    assert ckpt.load_state(tmp_path, "scheduler") == sched.state_dict()
    # the loaded state drives a fresh optimizer to the same next step, bit for bit
    fresh = torch.optim.AdamW(torch.nn.Linear(5, 3).parameters(), lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(back)
    assert fresh.state_dict()["param_groups"] == want["param_groups"]

    import numpy as np

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    ckpt.save_rng(tmp_path, 0)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.load_rng(tmp_path, 0)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_a_planted_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"state": Payload(marker)})
    pickle.loads(blob)  # the payload is live: unpickling it runs code
    assert marker.exists()
    marker.unlink()
    for name in ("optimizer", "scheduler", "rng-0"):
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
        torch.save({"x": Payload(marker)}, tmp_path / f"{name}.pt")  # the old layout's files, also planted
    with pytest.raises(DamagedFileError, match=re.escape("optimizer.safetensors")):
        ckpt.load_state(tmp_path, "optimizer")
    with pytest.raises(DamagedFileError, match=re.escape("rng-0.safetensors")):
        ckpt.load_rng(tmp_path, 0)
    assert not marker.exists()


def test_state_that_cannot_be_stored_without_pickle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LlmtuneError, match="cannot store a value of type object"):
        ckpt.save_state(tmp_path, "scheduler", {"lr_lambda": object()})


def test_a_tampered_state_tree_is_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "scheduler.safetensors"), metadata={"llmtune_tree": '{"__eval__": "1+1"}'})
    with pytest.raises(DamagedFileError, match="unexpected entry"):
        ckpt.load_state(tmp_path, "scheduler")
    save_file({}, str(tmp_path / "optimizer.safetensors"))
    with pytest.raises(DamagedFileError, match="not a readable llmtune state file"):
        ckpt.load_state(tmp_path, "optimizer")


# ------------------------------------------------------------------------------------------- manifests
def test_manifest_names_each_kind_of_damage(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "b.json").write_text('{"x": 1}\n')
    (tmp_path / "sub" / "c.bin").write_bytes(b"c" * 100)
    (tmp_path / "d.bin").write_bytes(b"d" * 10)
    write_manifest(tmp_path)
    verify_manifest(tmp_path)
    (tmp_path / "extra.txt").write_text("not listed, not checked")
    assert manifest_problems(tmp_path) == []

    with open(tmp_path / "a.bin", "r+b") as fh:
        fh.truncate(100)
    (tmp_path / "b.json").write_text('{"x": 2}\n')  # same size, other bytes
    (tmp_path / "sub" / "c.bin").unlink()
    (tmp_path / "sub").rmdir()
    (tmp_path / "d.bin").write_bytes(b"")
    found = manifest_problems(tmp_path)
    assert found == ["sub/: missing", "a.bin: truncated (100 bytes, manifest says 2048)",
                     "b.json: checksum mismatch (contents altered)", "d.bin: empty (0 bytes, manifest says 10)"]
    with pytest.raises(DamagedFileError, match=re.escape("a.bin: truncated")):
        verify_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("garbage")
    with pytest.raises(DamagedFileError, match=re.escape("manifest.json: not a readable manifest")):
        verify_manifest(tmp_path)


def test_a_directory_without_manifest_passes_only_when_not_required(tmp_path: Path) -> None:
    verify_manifest(tmp_path, required=False)
    with pytest.raises(DamagedFileError, match=re.escape("manifest.json: missing")):
        verify_manifest(tmp_path)


# ------------------------------------------------------------------------------------------- checkpoints
def test_commit_publishes_a_verified_checkpoint(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, 2)
    assert path == tmp_path / "checkpoints" / "step-000002"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    ckpt.verify(path)
    files = set(json.loads((path / "manifest.json").read_text())["files"])
    assert {"state.json", "optimizer.safetensors", "scheduler.safetensors", "rng-0.safetensors",
            "adapter/adapter_model.safetensors"} <= files
    # committing the same step again replaces it (no .old- left behind)
    again = make_checkpoint(tmp_path, 2)
    assert again == path and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


@pytest.mark.parametrize(("damage", "named"), [
    ("truncate_adapter", "adapter/adapter_model.safetensors: truncated"),
    ("empty_adapter", "adapter/adapter_model.safetensors: empty"),
    ("truncate_optimizer", "optimizer.safetensors: truncated"),
    ("garbage_state", "state.json: "),
    ("missing_adapter", "adapter/: missing"),
    ("missing_manifest", "manifest.json: missing"),
])
def test_latest_intact_skips_each_damaged_checkpoint_and_names_the_file(damage: str, named: str,
                                                                        tmp_path: Path) -> None:
    import shutil

    make_checkpoint(tmp_path, 1)
    newest = make_checkpoint(tmp_path, 2)
    target = {"truncate_adapter": newest / "adapter" / "adapter_model.safetensors",
              "empty_adapter": newest / "adapter" / "adapter_model.safetensors",
              "truncate_optimizer": newest / "optimizer.safetensors"}.get(damage)
    if target is not None:
        size = 0 if damage == "empty_adapter" else target.stat().st_size // 2
        with open(target, "r+b") as fh:
            fh.truncate(size)
    elif damage == "garbage_state":
        (newest / "state.json").write_text("{not json")
    elif damage == "missing_adapter":
        shutil.rmtree(newest / "adapter")
    else:
        (newest / "manifest.json").unlink()
    found, skipped = ckpt.latest_intact(tmp_path)
    assert found == tmp_path / "checkpoints" / "step-000001"
    assert [(e.event, e.path) for e in skipped] == [("checkpoint_skipped", str(newest)), ("fell_back", str(found))]
    assert named in skipped[0].reason
    assert ckpt.resolve_resume("auto", tmp_path) == (found, skipped)
    with pytest.raises(DamagedFileError, match=named.split(":")[0]):
        ckpt.resolve_resume(newest, tmp_path)  # a named checkpoint is not silently replaced by another


def test_resolve_resume_forms(tmp_path: Path) -> None:
    assert ckpt.resolve_resume(False, tmp_path) == (None, [])
    assert ckpt.resolve_resume("auto", tmp_path) == (None, [])  # nothing yet: a fresh start
    make_checkpoint(tmp_path, 3)
    newest = make_checkpoint(tmp_path, 5)
    assert ckpt.resolve_resume(True, tmp_path)[0] == newest
    assert ckpt.resolve_resume(tmp_path, tmp_path / "elsewhere")[0] == newest
    assert ckpt.resolve_resume(tmp_path / "checkpoints", tmp_path)[0] == newest
    with pytest.raises(ConfigError, match=r"resume='.*nope'"):
        ckpt.resolve_resume(tmp_path / "nope", tmp_path)
    for _step, path in ckpt.list_checkpoints(tmp_path):
        (path / "state.json").write_text("")
    with pytest.raises(DamagedFileError, match="no intact checkpoint"):
        ckpt.resolve_resume("auto", tmp_path)


def test_check_resumable_refuses_changed_settings_unless_allowed(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, 2)
    assert ckpt.check_resumable(path, FP)["step"] == 2
    longer = ckpt.Fingerprint(config={**FP.config, "max_steps": 8}, data="d1")
    with pytest.raises(OutputDirError, match=r"max_steps 4 -> 8, data 'd0' -> 'd1'.*--allow-change max_steps"):
        ckpt.check_resumable(path, longer)
    with pytest.raises(OutputDirError, match="data 'd0' -> 'd1'") as err:
        ckpt.check_resumable(path, longer, ["max_steps"])
    assert "max_steps" not in str(err.value)
    assert ckpt.check_resumable(path, longer, ["max_steps", "data"])["step"] == 2


def test_a_changed_rank_is_never_offered_as_an_allowed_change(tmp_path: Path) -> None:
    """A checkpoint's adapter of rank 4 does not load at rank 8: the error says so instead of suggesting
    --allow-change rank (which used to end in a raw RuntimeError from load_state_dict)."""
    path = make_checkpoint(tmp_path, 2)
    wider = ckpt.Fingerprint(config={**FP.config, "rank": 8}, data="d0")
    with pytest.raises(OutputDirError, match=r"rank 4 -> 8\); rank cannot change on resume") as err:
        ckpt.check_resumable(path, wider)
    assert "--allow-change" not in str(err.value)


@pytest.mark.parametrize(("names", "message"), [
    (["no_such_field"], r"allow_changes 'no_such_field' \(CLI --allow-change no_such_field\) is not a setting of "
                        r"this run\. A resume may change: .*\bmax_steps\b"),
    (["max_step"], "Did you mean 'max_steps'"),
    (["rank"], r"allow_changes 'rank' .*: rank shapes the trained weights.* A resume may change: .*\blr\b"),
    (["lr", "method"], "method shapes the trained weights"),
])
def test_allow_changes_names_a_changeable_setting(names: list[str], message: str) -> None:
    from llmtune.core.errors import InvalidOptionError
    from llmtune.trainers.options import TrainOptions

    with pytest.raises(InvalidOptionError, match=message) as err:
        ckpt.check_allow_changes(names, TrainOptions())
    assert err.value.field == "allow_changes" and "\n" not in str(err.value)
    assert ckpt.check_allow_changes(["lr", "data", "save_every"], TrainOptions(), free=["save_every"]) == (
        "lr", "data", "save_every")
    # a base re-saved (or a run.json from before content hashing) may be allowed explicitly
    assert ckpt.check_allow_changes(["model"], TrainOptions()) == ("model",)


def test_prune_keeps_the_newest_and_never_the_current(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    removed = ckpt.prune(tmp_path, 2, current=ckpt.step_dir(tmp_path, 8))
    assert [p.name for p in removed] == ["step-000002", "step-000004"]
    assert [p.name for _s, p in ckpt.list_checkpoints(tmp_path)] == ["step-000006", "step-000008"]
    # a checkpoint just written at a lower step than older ones is still kept
    current = make_checkpoint(tmp_path, 1)
    ckpt.prune(tmp_path, 2, current=current)
    assert [p.name for _s, p in ckpt.list_checkpoints(tmp_path)] == ["step-000001", "step-000008"]
    assert ckpt.prune(tmp_path, 0, current=current) == []
    assert not list((tmp_path / "checkpoints").glob(".trash-*"))


# ------------------------------------------------------------------------------------------- one run per directory
def test_claim_fresh_same_other_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    claimed = ckpt.claim_output_dir(out, FP)
    assert claimed.previous is None and claimed.events == []
    assert json.loads((out / "run.json").read_text())["digest"] == FP.digest
    make_checkpoint(out, 2)
    (out / "log.jsonl").write_text("{}\n")
    (out / "eval-before.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("the user's own file")
    again = ckpt.claim_output_dir(out, ckpt.Fingerprint(config=dict(FP.config), data="d0"))
    assert again.previous == FP  # the same run: fine
    other = ckpt.Fingerprint(config={**FP.config, "lr": 0.01}, data="d0")
    with pytest.raises(OutputDirError, match=r"holds another run \(lr 0.02 -> 0.01\).*--overwrite"):
        ckpt.claim_output_dir(out, other)
    with pytest.raises(OutputDirError, match=r"cannot resume .*lr 0\.02 -> 0\.01"):
        ckpt.claim_output_dir(out, other, resume=True)
    assert ckpt.claim_output_dir(out, other, resume=True, allow_changes=["lr"]).previous == FP
    with pytest.raises(OutputDirError, match=re.escape("lr 0.01 -> 0.02")):  # run.json now names the resumed (changed) run
        ckpt.claim_output_dir(out, FP)
    replaced = ckpt.claim_output_dir(out, FP, overwrite=True)
    assert [e.event for e in replaced.events] == ["overwrote"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run.json"]  # the user's file stays
    assert json.loads((out / "run.json").read_text())["digest"] == FP.digest


def test_claim_refuses_unidentified_or_garbled_runs(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 1)  # checkpoints but no run.json (written by something else)
    with pytest.raises(OutputDirError, match="cannot identify"):
        ckpt.claim_output_dir(tmp_path, FP)
    ckpt.claim_output_dir(tmp_path, FP, overwrite=True)
    assert ckpt.list_checkpoints(tmp_path) == []
    make_checkpoint(tmp_path, 1)
    (tmp_path / "run.json").write_text("{garbage")
    with pytest.raises(DamagedFileError, match=re.escape("run.json: not valid JSON")):
        ckpt.claim_output_dir(tmp_path, FP)
    ckpt.claim_output_dir(tmp_path, FP, overwrite=True)
    make_checkpoint(tmp_path, 1)
    (tmp_path / "run.json").write_text('{"digest": "x"}')
    with pytest.raises(DamagedFileError, match="no run fingerprint"):
        ckpt.claim_output_dir(tmp_path, FP)


def test_a_run_that_wrote_nothing_does_not_hold_the_directory(tmp_path: Path) -> None:
    ckpt.claim_output_dir(tmp_path, FP)  # e.g. the run then failed on its data
    other = ckpt.Fingerprint(config={**FP.config, "lr": 0.01}, data="d9")
    assert ckpt.claim_output_dir(tmp_path, other).previous is None
    assert json.loads((tmp_path / "run.json").read_text())["digest"] == other.digest


def test_fingerprint_changes_and_digest() -> None:
    a = ckpt.Fingerprint(config={"lr": 1e-4, "targets": ["q", "v"]}, data="x")
    b = ckpt.Fingerprint.from_dict(json.loads(json.dumps(a.to_dict())), Path("run.json"))
    assert a.digest == b.digest and a.changes(b) == {}
    c = ckpt.Fingerprint(config={"lr": 1e-4, "targets": ["q"], "rank": 8}, data="x")
    assert c.changes(a) == {"rank": (None, 8), "targets": (["q", "v"], ["q"])}
    assert c.digest != a.digest


# ------------------------------------------------------------------------------------------- crash paths
def test_recovery_after_a_crash_inside_commit(tmp_path: Path) -> None:
    """Every state a kill -9 can leave commit() in is finished or undone by the next claim."""
    import shutil

    ckpt.claim_output_dir(tmp_path, FP)
    root = tmp_path / "checkpoints"
    # (a) killed while assembling: a .tmp- without manifest is removed
    ckpt.begin(ckpt.step_dir(tmp_path, 3))
    # (b) killed between "final -> .old-" and ".tmp- -> final": the complete new copy is promoted
    make_checkpoint(tmp_path, 4)
    os.replace(root / "step-000004", root / ".old-step-000004")
    make_checkpoint(tmp_path, 4)
    os.replace(root / "step-000004", root / ".tmp-step-000004")
    # (c) an .old- whose replacement never arrived is put back
    make_checkpoint(tmp_path, 5)
    os.replace(root / "step-000005", root / ".old-step-000005")
    # (d) a half-deleted prune victim
    make_checkpoint(tmp_path, 1)
    os.replace(root / "step-000001", root / ".trash-step-000001")
    (root / ".trash-step-000001" / "state.json").unlink()
    # (e) a final adapter caught mid-rename at the top level
    shutil.copytree(root / ".tmp-step-000004" / "adapter", tmp_path / ".tmp-adapter")
    write_manifest(tmp_path / ".tmp-adapter")
    claimed = ckpt.claim_output_dir(tmp_path, FP)
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000005"]
    assert (tmp_path / "adapter" / "manifest.json").is_file()
    for _step, path in ckpt.list_checkpoints(tmp_path):
        ckpt.verify(path)
    assert {e.event for e in claimed.events} >= {"recovered"}


_KILL_DURING_PRUNE = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint import FP, make_checkpoint
    from llmtune.trainers import _checkpoint as ckpt
    out = Path(sys.argv[1])
    ckpt.claim_output_dir(out, FP)
    for step in (1, 2, 3):
        make_checkpoint(out, step)
    real = shutil.rmtree
    def rmtree_then_die(path, *args, **kwargs):
        if ".trash-" in str(path):  # delete part of the victim, then the process is killed
            os.remove(os.path.join(path, "state.json"))
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *args, **kwargs)
    shutil.rmtree = rmtree_then_die
    ckpt.prune(out, 2, current=make_checkpoint(out, 4))
""")


def test_kill_9_during_pruning_leaves_nothing_half_deleted(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_PRUNE, str(tmp_path), str(REPO / "tests" / "unit")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert (root / ".trash-step-000001").is_dir()  # the victim, half deleted, under a name nothing reads
    listed = ckpt.list_checkpoints(tmp_path)
    assert [s for s, _p in listed] == [2, 3, 4]
    for _step, path in listed:
        ckpt.verify(path)
    claimed = ckpt.claim_output_dir(tmp_path, FP)
    assert not (root / ".trash-step-000001").exists()
    assert [e.reason for e in claimed.events] == ["removed an unfinished trash directory"]
    assert ckpt.latest_intact(tmp_path) == (root / "step-000004", [])
