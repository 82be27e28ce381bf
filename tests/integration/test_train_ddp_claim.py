"""Two CPU processes (gloo): a refused output directory is refused on every rank, with the same error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WORKER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    from transformers import PreTrainedTokenizerFast
    import llmtune
    from llmtune.data import split_instructions
    from llmtune.models.tiny import build_tiny_model

    tok_dir, out, small = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    train, _ = split_instructions()
    opts = {"rank": 4, "batch_size": 2, "max_steps": 1, "progress": False, "max_length": 64}
    llmtune.get_trainer("lora", **opts).train(build_tiny_model(tok, seed=0, **small), train[:8], tokenizer=tok,
                                              output_dir=out + "/run")
    import torch.distributed as dist
    rank = dist.get_rank()
    try:   # another run (rank 8) in the same directory: refused
        llmtune.get_trainer("lora", **{**opts, "rank": 8}).train(build_tiny_model(tok, seed=0, **small), train[:8],
                                                                 tokenizer=tok, output_dir=out + "/run")
        got = {"error": None}
    except Exception as exc:
        got = {"error": type(exc).__name__, "message": str(exc)}
    json.dump({"rank": rank, **got}, open(f"{out}/rank{rank}.json", "w"))
    dist.barrier()   # both ranks still talk after the refusal: nobody hangs, nobody died
''')


def test_a_refused_output_dir_raises_the_same_error_on_every_rank(tmp_path: Path) -> None:
    from llmtune.models.tiny import train_tiny_tokenizer

    train_tiny_tokenizer().save_pretrained(str(tmp_path / "tok"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "tok"), str(tmp_path), json.dumps(SMALL)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["error"] == ranks[1]["error"] == "OutputDirError"
    assert ranks[0]["message"] == ranks[1]["message"] and "another run" in ranks[0]["message"].lower()
