#!/usr/bin/env bash
# One command for a lent GPU machine (issue 24): every GPU measurement ftprof needs, each step time-boxed.
#
#   bash launch/gpu_check.sh [--dry-run] [OUTDIR]      # OUTDIR defaults to $OUT, else ./gpu-check
#
# Writes OUTDIR/gpu-check.tar.gz (everything below, logs included) and OUTDIR/summary.txt:
#   env.txt          GPU, driver, CUDA, nvcc, python and package versions
#   matmul.json      the measured bf16 matmul ceiling (bench/bench_matmul.py), MFU's denominator
#   profiles/<gpu>-bert-base-uncased, profiles/<gpu>-distilbert-base-uncased, profiles/<gpu>-distilbert-maxbatch
#                    ftprof sweeps: NVML, max_memory_allocated and max_memory_reserved per point
#   trainer_vs_deepspeed.jsonl   plain HF Trainer vs the launcher's ZeRO-0 / ZeRO-2, samples/s
#   profiles/<gpu>-distilbert-base-uncased-snapshot   one point's CUDA allocator snapshot (the allocator model's check)
#   logs/pytest_gpu.log   pytest -m gpu (first: --trace's estimate against real steps, tests/gpu/test_traced_gpu.py)
#   profiles/<gpu>-gpt2   a decoder (causal LM): plain Trainer (--zero none, autocast) beside ZeRO-2
#   steps.tsv        each step's exit code and seconds (124: cut by its time box)
#
# Wheels the machine lacks (deepspeed, datasets, evaluate, ...; ../shared/tools/device-wheels.sh gathers them
# into .whl/) are installed from .whl/ when it is there. DeepSpeed steps the Trainer's torch optimizer (fused
# AdamW) instead of its JIT-built FusedAdam (FTPROF_DS_OPTIMIZER=torch): no CUDA op is compiled, and the plain
# Trainer comparison steps the same optimizer. --dry-run rehearses every step on a CPU with tiny models.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUTDIR="${1:-${OUT:-$PWD/gpu-check}}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/gpu-check.XXXXXX)"
TOTAL_S="${GPU_CHECK_TOTAL_S:-510}"   # the whole check; a step that would start past it is skipped
START=$(date +%s)
mkdir -p "$OUTDIR" "$WORK/logs" "$WORK/profiles"
cd "$ROOT" || exit 2

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export FTPROF_DS_OPTIMIZER=torch
PY="${PYTHON:-python3}"
if [[ $DRY == 1 && -x "$ROOT/.venv/bin/python" && -z "${PYTHON:-}" ]]; then PY="$ROOT/.venv/bin/python"; fi

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME SECONDS COMMAND...: run COMMAND with a time box, its output in logs/NAME.log.
step() {
  local name=$1 box=$2; shift 2
  local left=$(( TOTAL_S - $(elapsed) ))
  if (( left < 15 )); then
    printf '%s\tskipped\t0\n' "$name" >> "$WORK/steps.tsv"; echo "== $name: skipped (time)"; return
  fi
  (( box > left )) && box=$left
  echo "== $name (box ${box}s, at $(elapsed)s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$box" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$WORK/steps.tsv"
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s"; tail -n 4 "$WORK/logs/$name.log" | sed 's/^/   | /'
}

finish() {
  cp "$WORK/steps.tsv" "$OUTDIR/steps.tsv" 2>/dev/null
  { echo "gpu_check: $(elapsed)s, dry-run=$DRY"; cat "$WORK/steps.tsv"; echo; cat "$WORK/env.txt" 2>/dev/null
    for f in "$WORK"/logs/bench_*.log "$WORK"/logs/pytest_gpu.log; do [[ -f $f ]] && { echo "--- $f"; tail -n 40 "$f"; }; done
  } > "$OUTDIR/summary.txt"
  tar czf "$OUTDIR/gpu-check.tar.gz" -C "$WORK" . && echo "wrote $OUTDIR/gpu-check.tar.gz ($(elapsed)s)"
  if (( $(stat -c %s "$OUTDIR/gpu-check.tar.gz") > 15 * 2**20 )); then  # a file over 16 MiB does not come back
    tar czf "$OUTDIR/gpu-check.tar.gz" --exclude='./profiles/*snapshot*' -C "$WORK" .
    tar czf "$OUTDIR/snapshot.tar.gz" -C "$WORK/profiles" .
  fi
}
trap finish EXIT

# -- environment and packages ------------------------------------------------------------------------------
IMPORTS="import transformers, deepspeed, peft, datasets, accelerate; from transformers import Trainer; import ftprof.sweep.measure"
PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target)
if [[ $DRY == 0 && -d .whl ]]; then
  # The versions ftprof is tested with; if they do not import there, only what the machine lacks (its own
  # transformers, huggingface_hub, accelerate and peft then).
  step install_wheels 60 "${PIP[@]}" /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$ROOT/src:${PYTHONPATH:-}"
  if ! "$PY" -c "$IMPORTS" > "$WORK/logs/imports.log" 2>&1; then
    LACKING=$(ls .whl/*.whl | grep -vE '/(transformers|huggingface_hub|accelerate|peft|kernels|httpx2|httpcore2|truststore)-')
    step install_lacking 60 "${PIP[@]}" /tmp/site2 $LACKING
    export PYTHONPATH="/tmp/site2:$ROOT/src"
    echo "carried transformers stack failed to import; using the machine's own (logs/imports.log)" >> "$WORK/env.txt"
  fi
else
  export PYTHONPATH="$ROOT/src:${PYTHONPATH:-}"
fi
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
  echo "nvcc: $(command -v nvcc || echo none) $(nvcc --version 2>/dev/null | tail -n 1)"
  "$PY" - <<'EOF' 2>&1
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("transformers", "deepspeed", "accelerate", "peft", "datasets", "pynvml", "ftprof"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as err:  # noqa: BLE001
        print(name, "MISSING", type(err).__name__, err)
EOF
} >> "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

if [[ $DRY == 1 ]]; then
  GPU=cpu-dry; BIG=tiny-bert; SMALL=tiny-distilbert; DECODER=tiny-gpt2; SEQS=64,128; LONG=128; BATCHES=4,8; PREC=fp32
  MAXB=(--batch_sizes 4 --max_batch 16 --batch_step 4 --child_memory_limit 8GiB); BENCH=(--batch_size 8 --seq_len 64)
  MATMUL=(--n 1024 --repeats 3)
else
  GPU=$("$PY" -c "import torch; n=torch.cuda.get_device_name().upper(); print(next((g for g in ('h200','h100','a100') if g.upper() in n), 'gpu'))")
  BIG=bert-base-uncased; SMALL=distilbert-base-uncased; DECODER=gpt2; SEQS=128,512; LONG=512; BATCHES=8,64; PREC=bf16
  MAXB=(--batch_sizes 64 --max_batch 1024 --batch_step 32 --child_memory_limit 16GiB); BENCH=(--batch_size 32 --seq_len 128)
  MATMUL=()
fi
SWEEP=("$PY" -m ftprof.cli.main sweep --precision "$PREC" --steps 5 --warmup 2 --min_seconds 1 --no_remeasure --timeout 90)

# -- measurements, most valuable first ---------------------------------------------------------------------
# (what the H200 of 2026-12-04 did not measure comes first: --trace against real steps, a decoder)
step matmul 30 "$PY" bench/bench_matmul.py "${MATMUL[@]}" --json "$WORK/matmul.json"
step pytest_gpu 150 "$PY" -m pytest -p no:cacheprovider -m gpu -q -rfEs tests/gpu/test_traced_gpu.py \
  tests/gpu/test_nvml_gpu.py tests/gpu/test_nvml_mapping_gpu.py tests/gpu/test_memory_snapshot_gpu.py \
  tests/gpu/test_estimate_items_gpu.py
step sweep_decoder 90 "${SWEEP[@]}" --model "$DECODER" --task causal-lm --seq_lens "$LONG" --zero none,2 \
  --batch_sizes "${BATCHES%%,*}" --out "$WORK/profiles/$GPU-$DECODER"
step sweep_big 120 "${SWEEP[@]}" --model "$BIG" --seq_lens "$SEQS" --zero 0,2,3 --batch_sizes "$BATCHES" \
  --out "$WORK/profiles/$GPU-$BIG"
step sweep_small 60 "${SWEEP[@]}" --model "$SMALL" --seq_lens "$LONG" --zero 0,2,3 --batch_sizes "$BATCHES" \
  --out "$WORK/profiles/$GPU-$SMALL"
step max_batch 70 "${SWEEP[@]}" --model "$SMALL" --seq_lens "$LONG" --zero 2 --find_max_batch "${MAXB[@]}" \
  --out "$WORK/profiles/$GPU-$SMALL-maxbatch"
step bench_trainer_vs_deepspeed 60 "$PY" bench/bench_trainer_vs_deepspeed.py --model "$BIG" --precision "$PREC" \
  "${BENCH[@]}" --min_seconds 2 --jsonl "$WORK/trainer_vs_deepspeed.jsonl"
step snapshot 45 "${SWEEP[@]}" --model "$SMALL" --seq_lens "$LONG" --zero 0 --batch_sizes "${BATCHES%%,*}" \
  --memory_snapshot --no_report --out "$WORK/profiles/$GPU-$SMALL-snapshot"
exit 0
