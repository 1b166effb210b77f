#!/usr/bin/env bash
# The GPU check (issue 21): the CUDA tests and a throughput / peak-memory comparison with
# HF PEFT + Trainer on a 1B-class Llama shape, on one CUDA device, in under 8 minutes.
#
#   benchmarks/gpu_check.sh [OUT_DIR]        on a machine with a CUDA device
#   benchmarks/gpu_check.sh --dry [OUT_DIR]  the same steps on the CPU (tests with
#                                            PEFTLAB_GPU_CHECK_DRY=1, the benchmark --device cpu --tiny)
#
# OUT_DIR defaults to $OUT (the device machine's result folder), else ./gpu_check_out. It gets
# six files: summary.txt (the card from nvidia-smi, the software, each step's status and time),
# tests.log, measured.jsonl (each check's measured difference), gpu_bench.md / .json, bench.log.
# Needs python3 with torch (CUDA build), transformers, peft and pytest; nothing is downloaded:
# every model is randomly initialised and no tokenizer is loaded. Exit status: 0 when every step
# passed, 1 otherwise (later steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry" ]]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PEFTLAB_GPU_CHECK_OUT="$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
: >"$OUT_DIR/measured.jsonl"
status=0
t_start=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # step NAME TIMEOUT_S LOG COMMAND...: run, record status and seconds
  local name=$1 limit=$2 logfile=$3
  shift 3
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$logfile" 2>&1
  rc=$?
  if [[ $rc -ne 0 ]]; then status=1; fi
  note "step $name: exit $rc$([[ $rc -eq 124 ]] && echo ' (timed out)') in $(( $(date +%s) - t0 )) s (log: $(basename "$logfile"))"
}

note "peftlab GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), mode: $([[ $DRY == 1 ]] && echo 'dry (CPU)' || echo cuda)"
note "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
if [[ $DRY == 0 ]]; then
  if command -v nvidia-smi >/dev/null; then
    note "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
  else
    note "card: nvidia-smi not found"
  fi
fi
"$PY" - >>"$SUMMARY" 2>&1 <<'EOF'
import importlib.util, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"torch device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
for name in ("transformers", "peft", "bitsandbytes", "flash_attn", "pytest"):
    spec = importlib.util.find_spec(name)
    version = getattr(__import__(name), "__version__", "?") if spec else "not installed"
    print(f"{name}: {version}")
EOF
if [[ $? -ne 0 ]]; then note "python3 with torch is needed (PYTHON=... to choose another)"; exit 1; fi
if [[ $DRY == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "no CUDA device visible to torch: run with --dry for the CPU dry run"
  exit 1
fi

# 1. the CUDA tests (tests/test_cuda.py, marked cuda): autocast bf16/fp16 vs fp32, packing
#    (SDPA and varlen), NF4, generation, the multi-adapter engine (no tokenizer or model asset needed)
if [[ $DRY == 1 ]]; then export PEFTLAB_GPU_CHECK_DRY=1; fi
step tests 240 "$OUT_DIR/tests.log" "$PY" -m pytest tests/test_cuda.py -o addopts="" -p no:cacheprovider -q -rs
tail -n 3 "$OUT_DIR/tests.log" | sed 's/^/  /' | tee -a "$SUMMARY"

# 2. throughput and peak memory, peftlab vs PEFT + Trainer
if [[ $DRY == 1 ]]; then
  step bench 300 "$OUT_DIR/bench.log" "$PY" benchmarks/gpu_bench.py --device cpu --tiny --out "$OUT_DIR"
else
  step bench 330 "$OUT_DIR/bench.log" "$PY" benchmarks/gpu_bench.py --device cuda --out "$OUT_DIR"
fi
[[ -f "$OUT_DIR/gpu_bench.md" ]] && sed 's/^/  /' "$OUT_DIR/gpu_bench.md" | tee -a "$SUMMARY"

note "measured:"
sed 's/^/  /' "$OUT_DIR/measured.jsonl" | tee -a "$SUMMARY"
note "total $(( $(date +%s) - t_start )) s; $([[ $status -eq 0 ]] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
exit $status
