#!/usr/bin/env bash
# The GPU runner's entry point (also `nox -s bench-gpu`): runs the four benchmark questions, each under its own
# time limit so the whole fits in 10 minutes on one H100, and writes JSON lines:
#   (a) train_throughput.jsonl      plain PEFT recipe vs llmtune peft vs llmtune unsloth (LoRA, QLoRA, 2 archs)
#   (b) memory_validation.jsonl     llmtune.memory predicted vs measured peak memory
#   (c) quantization_quality.jsonl  perplexity / size / time of fp32, RTN, GPTQ, NF4, INT8
#   (d) metrics_speed.jsonl         ROUGE/BLEU speed (CPU)
# plus env.json (GPU, driver, versions, the command) and summary.jsonl (one line per step: exit code, seconds).
#
# Usage: bash benchmarks/run_gpu.sh [RESULTS_DIR]
#   RESULTS_DIR defaults to $OUT/bench (when $OUT names an output folder) or benchmarks/results/<UTC time>.
#   PYTHON (default python3) is the interpreter; if ./device-site exists (built with
#   ../shared/tools/device-site.sh device-site accelerate) it is put on PYTHONPATH, with the checkout itself.
#   BENCH_ONLY="a b" runs only those steps. BENCH_FULL_GRID=1 adds the 8x1024 shape to (a) (over 10 minutes).
#   BENCH_SMOKE=1 runs (a) on its tiny CPU grid (to check the script itself on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${1:-${OUT:+$OUT/bench}}
RESULTS=${RESULTS:-benchmarks/results/$STAMP}
mkdir -p "$RESULTS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$ROOT/device-site" ]; then
  export PYTHONPATH="$ROOT/device-site:$PYTHONPATH"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
ONLY=${BENCH_ONLY:-a b c d}
T0=$(date +%s)

"$PY" - "$RESULTS/env.json" "$*" <<'EOF'
import importlib.metadata as md, json, platform, subprocess, sys, datetime
info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "bash benchmarks/run_gpu.sh " + sys.argv[2], "python": platform.python_version(),
        "host": platform.node(), "cpu_count": __import__("os").cpu_count()}
for d in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "trl", "numpy"):
    try:
        info[d] = md.version(d)
    except md.PackageNotFoundError:
        info[d] = None
try:
    import torch
    info["cuda"] = torch.version.cuda
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["gpu_total_MiB"] = round(torch.cuda.mem_get_info()[1] / 2**20) if torch.cuda.is_available() else None
except Exception as exc:
    info["torch_error"] = repr(exc)
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except Exception:
    info["nvidia_smi"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF

step() {  # step NAME LIMIT_SECONDS COMMAND...: stdout -> NAME.jsonl, stderr -> NAME.log, a line in summary.jsonl
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$RESULTS/$name.jsonl" 2>"$RESULTS/$name.log"
  local rc=$?
  local lines=$(grep -c '^{' "$RESULTS/$name.jsonl" || true)
  printf '{"bench": "run_gpu", "step": "%s", "rc": %d, "timed_out": %s, "seconds": %d, "json_lines": %d}\n' \
    "$name" "$rc" "$( { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && echo true || echo false)" "$(( $(date +%s) - t ))" "$lines" \
    | tee -a "$RESULTS/summary.jsonl"
}
want() { case " $ONLY " in *" $1 "*) return 0;; *) return 1;; esac; }

# (a) <5 min: 2 archs x {4x512, 1x2048} x {LoRA, QLoRA} x {plain, peft, unsloth}; each recipe child has a budget
if want a; then
  GRID="4x512,1x2048"; [ "${BENCH_FULL_GRID:-0}" = 1 ] && GRID="4x512,1x2048,8x1024"
  SIZE=(--grid "$GRID"); [ "${BENCH_SMOKE:-0}" = 1 ] && SIZE=(--smoke)
  step train_throughput 310 "$PY" benchmarks/train_throughput.py "${SIZE[@]}" --budget-s 80 \
    --workdir /tmp/llmtune-bench-models
  # diagnostic: Unsloth's own recipe on the target shape, to see whether llmtune keeps all of its advantage
  PLAIN_SIZE=(--models llama3.2-1b --grid 4x512); [ "${BENCH_SMOKE:-0}" = 1 ] && PLAIN_SIZE=(--smoke)
  step train_throughput_unsloth_plain 45 "$PY" benchmarks/train_throughput.py --recipes unsloth-plain \
    "${PLAIN_SIZE[@]}" --budget-s 25 --workdir /tmp/llmtune-bench-models
fi
# (b) ~2 min: llmtune.memory predicted vs measured (benchmarks/memory_validation.py)
if want b; then
  if [ -f benchmarks/memory_validation.py ]; then
    step memory_validation 110 "$PY" benchmarks/memory_validation.py
  else
    echo '{"bench": "run_gpu", "step": "memory_validation", "error": "benchmarks/memory_validation.py is missing"}' \
      | tee -a "$RESULTS/summary.jsonl"
  fi
fi
# (c) <1.5 min: quantization quality on the tiny model
if want c; then
  step quantization_quality 75 "$PY" benchmarks/quantization_quality.py
fi
# (d) ~40 s: metric speed (CPU)
if want d; then
  step metrics_speed 55 "$PY" benchmarks/metrics_speed.py --repeats 3 --corpora short --ter-pairs 200
fi
echo "{\"bench\": \"run_gpu\", \"total_seconds\": $(( $(date +%s) - T0 )), \"results\": \"$RESULTS\"}" \
  | tee -a "$RESULTS/summary.jsonl"
