"""Two processes on CPU (gloo, torch.distributed.run): the ranks agree, and match one process at the same global batch."""

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

import llmtune  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}
OPTS = {"rank": 4, "alpha": 8, "lr": 2e-2, "warmup": 0, "dropout": 0.0, "max_steps": 4, "progress": False,
        "max_length": 96, "eval_examples": 4, "max_new_tokens": 4}

WORKER = textwrap.dedent('''
    import hashlib, json, sys
    import torch
    torch.set_num_threads(1)
    from transformers import PreTrainedTokenizerFast
    import llmtune
    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model

    tok_dir, out, small, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    train, held = split_instructions()
    model = build_tiny_model(tok, seed=0, **small)
    result = llmtune.get_trainer("lora", **opts).train(model, train[:32], eval_data=held[:3], tokenizer=tok,
                                                        output_dir=out + "/run")
    import torch.distributed as dist
    rank = dist.get_rank()
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode()); h.update(p.detach().cpu().numpy().tobytes())
    json.dump({"rank": rank, "world": dist.get_world_size(), "losses": [r["loss"] for r in result.history],
               "weights": h.hexdigest(), "eval": result.eval, "world_size": result.extra["world_size"]},
              open(f"{out}/rank{rank}.json", "w"))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_cpu_processes_agree_with_each_other_and_with_one_process(tmp_path: Path) -> None:
    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ddp_opts = {**OPTS, "batch_size": 2, "grad_accum": 2}   # global batch 2 x 2 x 2 processes = 8
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "tok"), str(tmp_path),
           json.dumps(SMALL), json.dumps(ddp_opts)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks: list[dict[str, Any]] = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["world_size"] == 2
    # the ranks agree exactly: same (all-reduced) loss curve, same adapter weights, same evaluation
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["eval"] == ranks[1]["eval"] and ranks[0]["eval"]["after"]["n"] == 3
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # and one process at the same global batch (4 x 2) sees the same examples per step: the same curve
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, _ = split_instructions()
        single = llmtune.get_trainer("lora", **{**OPTS, "batch_size": 4, "grad_accum": 2}).train(
            build_tiny_model(tok, seed=0, **SMALL), train[:32], tokenizer=tok, output_dir=tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    assert [r["loss"] for r in single.history] == pytest.approx(ranks[0]["losses"], rel=1e-5, abs=1e-6)


DPO_WORKER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    from transformers import PreTrainedTokenizerFast
    import llmtune
    from llmtune.models.tiny import build_tiny_model

    tok_dir, out, small, opts, records = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:6])
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    result = llmtune.get_trainer("dpo", **opts).train(build_tiny_model(tok, seed=0, **small), records, tokenizer=tok,
                                                       output_dir=out + "/run")
    import torch.distributed as dist
    json.dump(result.history, open(f"{out}/rank{dist.get_rank()}.json", "w"))
''')


def _preferences() -> list[dict[str, Any]]:
    """Groups of different sizes, so the processes' shares weigh differently (3, 1, 6 pairs...)."""
    drinks = ["Kopi O", "Teh C", "Milo Peng", "Kopi Siew Dai", "Teh Halia", "Bandung", "Yuan Yang", "Kopi Gau"]
    answers = ["Black coffee with sugar.", "Tea.", "Coffee with milk.", "Iced milo.", "Ginger tea."]
    out: list[dict[str, Any]] = []
    for i, d in enumerate(drinks):
        k = 2 + i % 3
        out.append({"prompt": f"What is {d}?", "responses": answers[:k], "ranking": list(range(k))})
    return out


def test_two_processes_log_the_global_batch_dpo_statistics(tmp_path: Path) -> None:
    """Per-step DPO statistics (accuracy, margins, log-probs) are the whole global batch's, on every rank, and equal
    one process's at the same global batch — not each process's own share."""
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer

    tok = train_tiny_tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    script = tmp_path / "dpo_worker.py"
    script.write_text(DPO_WORKER)
    opts = {"method": "lora", "rank": 4, "alpha": 8, "lr": 2e-2, "warmup": 0, "max_steps": 3, "progress": False,
            "batch_size": 2, "beta": 0.1, "dropout": 0.0}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "tok"), str(tmp_path),
           json.dumps(SMALL), json.dumps(opts), json.dumps(_preferences())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    keys = ("loss", "accuracy", "reward_margin", "logps_chosen", "logps_rejected", "rewards_chosen")
    assert [[r[k] for k in keys] for r in ranks[0]] == [[r[k] for k in keys] for r in ranks[1]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = llmtune.get_trainer("dpo", **{**opts, "batch_size": 4}).train(
            build_tiny_model(tok, seed=0, **SMALL), _preferences(), tokenizer=tok, output_dir=tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(single.history, ranks[0]):
        for k in keys:
            assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-5), (k, one, two)
