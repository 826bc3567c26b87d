#!/usr/bin/env bash
# One GPU session (one H100, 16 cores, ~9 min wall): the paper reproduction and a long
# architecture sweep on the quick task, everything under OUT.
#
#   scripts/device_paper.sh OUT
#
# Phases (progress lines start with "[device]"; full logs in OUT/*.log):
#   1. icl-heads reproduce --preset paper --seeds 1 --device cuda --out OUT/paper  (E5, E1..E6, report);
#      E1 trains the four head counts as one stack on CUDA.
#   2. icl-heads sweep-arch on quick: L in {2,3,4} x MLP {off,on} x h in {1,4} x 3 seeds, one stack
#      per (L, MLP), SWEEP_JOBS stacks at once, into OUT/quick-long/L{L}-mlp{0|1}/seed{k}/h{h}/.
#      By default it trains *while* phase 1 runs (SWEEP_PARALLEL=1): phase 1 starts with the CPU-only
#      E5 stage, and these small stacks are launch-bound, so they share the GPU well.
#   3. assess-heads and prune (with --ablation zero,mean when the CLI has it) on every h=4 model,
#      ANALYSIS_JOBS at once, then OUT/quick-long/table.csv (risk at n=d, 2d per h; top-head share
#      per layer and pruned/full of h=4, per ablation kind).
#
# Sizing (environment; defaults in brackets):
#   PAPER_STEPS [12000]  train.steps of the paper models (the preset's 50000 does not fit 9 min)
#   SWEEP_STEPS [20000]  train.steps of every sweep model
#   SWEEP_JOBS [6] ANALYSIS_JOBS [6] SWEEP_PARALLEL [1] DEVICE [cuda] PYTHON [python] BOOT [1000]
#   SWEEP_LAYERS [2,3,4] SWEEP_MLP [0,1] SWEEP_HEADS [1,4] (the last one is analysed) SWEEP_SEEDS [3]
#   SKIP_PAPER / SKIP_SWEEP [0]   PAPER_PRESET [paper] SWEEP_PRESET [quick]
#   PAPER_SET / SWEEP_SET / ANALYSIS_ARGS: extra "--set k=v ..." / analysis options (the CPU dry-run test
#   in tests/test_device_script.py uses them to shrink everything).
#   BENCH=1: phase 0 runs benchmarks/train_throughput.py --stacked (quick, paper) on the device first and
#     keeps its output (OUT/bench_*.txt); with AUTO_SIZE=1 scripts/device_size.py then sets PAPER_STEPS,
#     PAPER_WARMUP (10%) and SWEEP_STEPS so that training fits PAPER_WINDOW / SWEEP_WINDOW seconds [200].
#   PAPER_SEEDS [1]  PAPER_THREADS [1] (reproduce --threads)  PAPER_ARGS (e.g. --no-e6-any-t)
#   E5_FROM=DIR: reuse DIR/e5 (an E5 of the same task/eval/seed made on a CPU; E5 needs no GPU).
#   scripts/device_pack.sh OUT DEST packs the results into the few files a lent machine returns.
#
# GPU time, an ESTIMATE (no GPU was available to measure; CPU figures measured on a loaded 2-core
# machine, docs/training.md "Stacked training"):
#   * paper stack (h = 1, 2, 4, 8; D=256, L=4, batch 128, 81 tokens): ~3.2M params/model, 6 x 3.2M x
#     128 x 81 x 4 models ~ 0.8 TFLOP per stack step; at a sustained 50-150 TFLOP/s (TF32, mid-sized
#     batched matmuls) that is ~5-16 ms/step, so 12000 steps ~ 1-3 min. (CPU here, one thread, load
#     ~7: ~10 s per paper model step.) The rest of reproduce (E5 with 4000 test prompts, E2-E6
#     analyses, report) is CPU-heavy: budget ~2-3 min.
#   * quick stacks (6 members each, D=64, batch 64): launch-bound, ~300-400 kernels per step,
#     ~3-5 ms/step per process; with 6 processes sharing the GPU, ~150-250 steps/s each if the GPU
#     interleaves them well, so 20000 steps ~ 1.5-2.5 min for all six stacks; analyses + table ~1 min.
#   Size it by scaling the steps: wall ~ fixed (~3 min) + PAPER_STEPS x ~12 ms + (in parallel)
#   SWEEP_STEPS x ~6 ms. If the first run shows other rates, the per-phase times printed below and
#   OUT/quick-long/sweep.json (train_wall_s) and OUT/paper/manifest.json give the numbers to rescale.
set -uo pipefail

OUT=${1:?usage: scripts/device_paper.sh OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
PAPER_STEPS=${PAPER_STEPS:-12000}
SWEEP_STEPS=${SWEEP_STEPS:-20000}
SWEEP_JOBS=${SWEEP_JOBS:-6}
SWEEP_LAYERS=${SWEEP_LAYERS:-2,3,4}
SWEEP_MLP=${SWEEP_MLP:-0,1}
SWEEP_HEADS=${SWEEP_HEADS:-1,4}
SWEEP_SEEDS=${SWEEP_SEEDS:-3}
ANALYSIS_JOBS=${ANALYSIS_JOBS:-6}
SWEEP_PARALLEL=${SWEEP_PARALLEL:-1}
PAPER_PRESET=${PAPER_PRESET:-paper}
SWEEP_PRESET=${SWEEP_PRESET:-quick}
PAPER_SET=${PAPER_SET:-}
SWEEP_SET=${SWEEP_SET:-}
ANALYSIS_ARGS=${ANALYSIS_ARGS:-}
SWEEP="$OUT/quick-long"
ICL=("$PY" -m icl_heads)
mkdir -p "$OUT" "$SWEEP"
T0=$(date +%s)
log() { echo "[device] $(( $(date +%s) - T0 ))s: $*"; }
status=0

sweep_train() {
  # shellcheck disable=SC2086
  "${ICL[@]}" sweep-arch --preset "$SWEEP_PRESET" --out "$SWEEP" --layers "$SWEEP_LAYERS" --mlp "$SWEEP_MLP" \
    --heads "$SWEEP_HEADS" --seeds "$SWEEP_SEEDS" \
    --device "$DEVICE" --stacked --jobs "$SWEEP_JOBS" --set train.steps="$SWEEP_STEPS" $SWEEP_SET
}

"$PY" -c "import torch; print('[device] torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

if [[ "${BENCH:-0}" == 1 ]]; then
  # phase 0: the stacked-vs-separate benchmark on this device (issue 11's ratio), which also sizes the run
  log "phase 0: benchmarks/train_throughput.py --stacked (quick, paper) on $DEVICE"
  "$PY" "$ROOT/benchmarks/train_throughput.py" --stacked --device "$DEVICE" --preset quick --blocks 3 --steps 20 \
    > "$OUT/bench_quick.txt" 2>&1 && cat "$OUT/bench_quick.txt"
  "$PY" "$ROOT/benchmarks/train_throughput.py" --stacked --device "$DEVICE" --preset paper --blocks 3 --steps 10 \
    > "$OUT/bench_paper.txt" 2>&1 && cat "$OUT/bench_paper.txt"
  if [[ "${AUTO_SIZE:-0}" == 1 ]] && sizes=$("$PY" "$ROOT/scripts/device_size.py" "$OUT/bench_quick.txt" \
       "$OUT/bench_paper.txt" "${PAPER_WINDOW:-200}" "${SWEEP_WINDOW:-200}"); then
    eval "$sizes"
    log "sized from the benchmark: $(echo $sizes | tr '\n' ' ')"
  fi
fi
PAPER_SEEDS=${PAPER_SEEDS:-1}
PAPER_WARMUP=${PAPER_WARMUP:-}
[[ -n "$PAPER_WARMUP" ]] && PAPER_SET="--set train.warmup_steps=$PAPER_WARMUP $PAPER_SET"
if [[ -n "${E5_FROM:-}" && -d "$E5_FROM/e5" && ! -e "$OUT/paper/e5" ]]; then
  # E5 needs no GPU: a CPU-made E5 of the same task/eval/seed is reused (its stage fingerprint covers just those)
  mkdir -p "$OUT/paper" && cp -r "$E5_FROM/e5" "$OUT/paper/e5" && log "E5 taken from $E5_FROM"
fi
log "start: device=$DEVICE PAPER_STEPS=$PAPER_STEPS PAPER_SEEDS=$PAPER_SEEDS SWEEP_STEPS=$SWEEP_STEPS SWEEP_JOBS=$SWEEP_JOBS"

sweep_pid=""
if [[ "${SKIP_SWEEP:-0}" != 1 && "$SWEEP_PARALLEL" == 1 ]]; then
  log "phase 2 (sweep training) started in the background: $SWEEP/train.log"
  sweep_train > "$SWEEP/train.log" 2>&1 &
  sweep_pid=$!
fi

if [[ "${SKIP_PAPER:-0}" != 1 ]]; then
  log "phase 1: reproduce --preset $PAPER_PRESET (train.steps=$PAPER_STEPS): $OUT/paper.log"
  # shellcheck disable=SC2086
  if "${ICL[@]}" reproduce --preset "$PAPER_PRESET" --seeds "$PAPER_SEEDS" --device "$DEVICE" --out "$OUT/paper" \
       --threads "${PAPER_THREADS:-1}" ${PAPER_ARGS:-} --set train.steps="$PAPER_STEPS" $PAPER_SET > "$OUT/paper.log" 2>&1; then
    log "phase 1 done: $(tail -n 1 "$OUT/paper.log")"
  else
    status=1; log "phase 1 FAILED (tail of $OUT/paper.log follows)"; tail -n 20 "$OUT/paper.log"
  fi
fi

if [[ "${SKIP_SWEEP:-0}" != 1 ]]; then
  if [[ -n "$sweep_pid" ]]; then
    log "waiting for the sweep training"
    wait "$sweep_pid"; rc=$?
  else
    log "phase 2: sweep training: $SWEEP/train.log"
    sweep_train > "$SWEEP/train.log" 2>&1; rc=$?
  fi
  if [[ $rc != 0 ]]; then
    status=1; log "phase 2 FAILED (tail of $SWEEP/train.log follows)"; tail -n 20 "$SWEEP/train.log"
  else
    log "phase 2 done: $(tail -n 1 "$SWEEP/train.log")"
    ablation=()
    if "${ICL[@]}" prune --help 2>/dev/null | grep -q -- "--ablation"; then ablation=(--ablation zero,mean); fi
    log "phase 3: assess-heads and prune on every h=${SWEEP_HEADS##*,} model (${ablation[*]:-zero ablation only}), $ANALYSIS_JOBS at once"
    : > "$SWEEP/analysis.log"
    top=${SWEEP_HEADS##*,}
    for ck in "$SWEEP"/L*-mlp*/seed*/h"$top"; do
      # shellcheck disable=SC2086
      echo "${ICL[*]} assess-heads $ck --out ${ck}-e2 --device $DEVICE ${ablation[*]} $ANALYSIS_ARGS --boot ${BOOT:-1000}"
      # shellcheck disable=SC2086
      echo "${ICL[*]} prune $ck --out ${ck}-e3 --device $DEVICE ${ablation[*]} $ANALYSIS_ARGS"
    done | xargs -P "$ANALYSIS_JOBS" -I CMD sh -c 'CMD >> "$0" 2>&1 || echo "FAILED: CMD" >> "$0"' "$SWEEP/analysis.log"
    if grep -q "^FAILED" "$SWEEP/analysis.log"; then status=1; log "some analyses failed:"; grep "^FAILED" "$SWEEP/analysis.log"; fi
    # shellcheck disable=SC2086
    if "${ICL[@]}" sweep-arch --preset "$SWEEP_PRESET" --out "$SWEEP" --device "$DEVICE" --set train.steps="$SWEEP_STEPS" \
         $SWEEP_SET --table > "$SWEEP/table.log" 2>&1; then
      log "phase 3 done: $(tail -n 1 "$SWEEP/table.log")"
    else
      status=1; log "table FAILED"; tail -n 20 "$SWEEP/table.log"
    fi
  fi
fi
log "all done (exit $status); outputs under $OUT"
exit $status
