"""FSDP2 on two CPU processes (gloo): the saved adapter equals DDP's, reloads in plain PEFT, resumes exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("torch.distributed.fsdp")

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
# lr 2e-3: at 2e-2 the adapters differ by 2.6e-6 after 4 steps (Adam's first steps move every weight by ~lr
# whatever the gradient's size, so last-bit differences of the sharded matmuls grow); the losses still agree
OPTS = {"rank": 4, "alpha": 8, "lr": 2e-3, "warmup": 0, "dropout": 0.0, "max_steps": 4, "progress": False,
        "max_length": 96, "eval_examples": 4, "max_new_tokens": 4, "batch_size": 2, "grad_accum": 2,
        "scheduler": "constant", "eval_every": 2}

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import PreTrainedTokenizerFast
    import llmtune
    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model

    tok_dir, out, small, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    train, held = split_instructions()

    def run(name, resume=False, allow_changes=(), **kw):
        model = build_tiny_model(tok, seed=0, **small)
        r = llmtune.get_trainer("lora", **{**opts, **kw}).train(model, train[:32], eval_data=held[:3],
                                                                 tokenizer=tok, output_dir=f"{out}/{name}",
                                                                 resume=resume, allow_changes=allow_changes)
        return {"losses": [h["loss"] for h in r.history], "grad_norms": [h["grad_norm"] for h in r.history],
                "eval": r.eval, "steps": r.extra["steps"],
                "in_loop": [h["eval"] for h in r.history if "eval" in h]}

    got = {"ddp": run("ddp"), "fsdp": run("fsdp", distributed="fsdp", save_every=2)}
    # resume: 2 steps with a checkpoint, then continue to 4 from it
    run("resumed", distributed="fsdp", save_every=2, max_steps=2)
    got["resumed"] = run("resumed", distributed="fsdp", save_every=2, resume="auto", allow_changes=("max_steps",))
    json.dump({"rank": dist.get_rank(), **got}, open(f"{out}/rank{dist.get_rank()}.json", "w"))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _adapter(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_fsdp_adapter_equals_ddp_reloads_in_peft_and_resumes_exactly(tmp_path: Path) -> None:
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "tok"), str(tmp_path),
           json.dumps(SMALL), json.dumps(OPTS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # the ranks agree; FSDP follows DDP's trajectory (loss, clipped-gradient norm, in-loop and final eval)
    assert {**r0, "rank": 1} == r1
    ddp, fsdp, resumed = r0["ddp"], r0["fsdp"], r0["resumed"]
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5, abs=1e-6)
    assert fsdp["grad_norms"] == pytest.approx(ddp["grad_norms"], rel=1e-5)
    assert len(fsdp["in_loop"]) == len(ddp["in_loop"]) == 1   # eval_every=2 of 4 steps: at step 2
    for f, d in [(fsdp["eval"]["before"], ddp["eval"]["before"]), (fsdp["eval"]["after"], ddp["eval"]["after"]),
                 (fsdp["in_loop"][0], ddp["in_loop"][0])]:
        assert f["loss"] == pytest.approx(d["loss"], rel=1e-5) and f["n"] == d["n"] == 3
        assert f["rougeL"] == pytest.approx(d["rougeL"])   # the same greedy answers
    # the saved adapter: full (unsharded) tensors, equal to DDP's to 1e-6
    a_ddp, a_fsdp = _adapter(tmp_path / "ddp" / "adapter"), _adapter(tmp_path / "fsdp" / "adapter")
    assert a_ddp.keys() == a_fsdp.keys() and a_ddp
    for k in a_ddp:
        assert a_fsdp[k].shape == a_ddp[k].shape
        assert torch.allclose(a_fsdp[k], a_ddp[k], atol=1e-6, rtol=0), (k, (a_fsdp[k] - a_ddp[k]).abs().max())
    # and the checkpoint's adapter is the step-2 one (gathered, not a shard)
    step2 = _adapter(tmp_path / "fsdp" / "checkpoints" / "step-000002" / "adapter")
    assert step2.keys() == a_ddp.keys() and any(not torch.equal(step2[k], a_fsdp[k]) for k in step2)
    # resume from the step-2 checkpoint (model + optimizer state + scheduler + RNG): bit-identical to no stop
    assert resumed["steps"] == 4 and resumed["losses"] == fsdp["losses"]
    a_resumed = _adapter(tmp_path / "resumed" / "adapter")
    assert all(torch.equal(a_resumed[k], a_fsdp[k]) for k in a_fsdp)
    # plain PEFT reloads it on a plain (unsharded) model: the same outputs as DDP's adapter
    from peft import PeftModel

    ids = torch.tensor([tok("What is Kopi O?", add_special_tokens=False)["input_ids"]])
    outs = []
    for name in ("ddp", "fsdp"):
        m = PeftModel.from_pretrained(build_tiny_model(tok, seed=0, **SMALL), str(tmp_path / name / "adapter"))
        with torch.no_grad():
            outs.append(m(input_ids=ids).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    base = build_tiny_model(tok, seed=0, **SMALL)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, outs[1], atol=1e-5)   # the adapter does something
    diff = max(float((a_fsdp[k] - a_ddp[k]).abs().max()) for k in a_ddp)
    print(json.dumps({"fsdp_vs_ddp_adapter_max_abs_diff": diff}))


FULL_WORKER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import PreTrainedTokenizerFast
    import llmtune
    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model

    tok_dir, out, small, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    train, held = split_instructions()

    def run(name, resume=False, allow_changes=(), **kw):
        r = llmtune.get_trainer("sft", **{**opts, **kw}).train(
            build_tiny_model(tok, seed=0, **small), train[:32], eval_data=held[:3], tokenizer=tok,
            output_dir=f"{out}/{name}", resume=resume, allow_changes=allow_changes)
        return {"losses": [h["loss"] for h in r.history], "eval": r.eval}

    got = {"ddp": run("ddp"), "fsdp": run("fsdp", distributed="fsdp")}
    run("resumed", distributed="fsdp", max_steps=2)
    got["resumed"] = run("resumed", distributed="fsdp", resume="auto", allow_changes=("max_steps",))
    json.dump(got, open(f"{out}/rank{dist.get_rank()}.json", "w"))
''')


def test_fsdp_full_fine_tuning_saves_the_whole_model_as_ddp_does(tmp_path: Path) -> None:
    """method='full': every weight (tied embeddings included) sharded, gathered, saved; resumed exactly."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmtune.models.tiny import train_tiny_tokenizer

    train_tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    script = tmp_path / "worker.py"
    script.write_text(FULL_WORKER)
    opts = {**{k: OPTS[k] for k in ("warmup", "progress", "max_length", "eval_examples", "max_new_tokens",
                                    "batch_size", "grad_accum", "scheduler")},
            "method": "full", "lr": 2e-3, "max_steps": 3, "save_every": 2}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "tok"), str(tmp_path),
           json.dumps(SMALL), json.dumps(opts)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["fsdp"]["losses"] == pytest.approx(r0["ddp"]["losses"], rel=1e-5)
    assert r0["fsdp"]["eval"]["after"]["loss"] == pytest.approx(r0["ddp"]["eval"]["after"]["loss"], rel=1e-5)
    assert r0["resumed"]["losses"] == r0["fsdp"]["losses"]
    ddp, fsdp, resumed = (load_file(str(tmp_path / n / "model" / "model.safetensors"))
                          for n in ("ddp", "fsdp", "resumed"))
    assert ddp.keys() == fsdp.keys() == resumed.keys()
    for k in ddp:
        assert fsdp[k].shape == ddp[k].shape and torch.allclose(fsdp[k], ddp[k], atol=1e-6, rtol=0), k
        assert torch.equal(resumed[k], fsdp[k]), k
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fsdp" / "model"))
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in fsdp.items())
