#!/usr/bin/env bash
# One GPU session: train the fixed-length zoo (configurations B, D; every seed and head count) as
# stacks on one GPU, grow the accumulating ones (A, E, C) from the repository's state, write the model
# cards, then (with the time left) the paper preset longer.
#
#   scripts/device_zoo.sh OUT
#
# Phases (progress lines start with "[device]"; logs in OUT/*.log):
#   0. BENCH=1: benchmarks/train_throughput.py --stacked on the device (OUT/bench_quick.txt), to size
#      the run before anything long starts.
#   1. icl-heads zoo train --stacked --device $DEVICE --root OUT/zoo --work OUT/zoo-train
#      (ZOO_SET: extra "--set k=v" for every configuration, e.g. a dry run's tiny sizes).
#   1b. ACC_MINUTES>0: the accumulating configurations (ACC_CONFIGS [A,E,C]) grow on the device from the
#      repository's resumable state (copied to OUT/zoo_state first), the same trainer as on CPU:
#      icl-heads zoo train --config A,E,C --minutes $ACC_MINUTES --device $DEVICE --state OUT/zoo_state
#      (copy OUT/zoo_state over zoo_state/ and OUT/zoo over zoo/ and commit: the GPU's steps add up).
#   2. icl-heads zoo cards and zoo verify on OUT/zoo (copy OUT/zoo over the repository's zoo/ and commit).
#   3. SKIP_PAPER=0: icl-heads reproduce --preset paper --seeds 1 --set train.steps=$PAPER_STEPS.
# Environment: DEVICE [cuda] PYTHON [python] ZOO_CONFIGS [B,D] PAPER_STEPS [20000] SKIP_PAPER [0]
#   ACC_MINUTES [0] ACC_CONFIGS [A,E,C] ACC_JOBS [4] ACC_FROM_REPO [1]
#   PAPER_SET (extra --set for the paper run) BENCH [0].
# tests/test_device_script.py dry-runs this script on the CPU with tiny sizes so it cannot rot.
set -euo pipefail
OUT=${1:?usage: scripts/device_zoo.sh OUT}
DEVICE=${DEVICE:-cuda}; PY=${PYTHON:-python}; CONFIGS=${ZOO_CONFIGS:-B,D}
ICL=("$PY" -m icl_heads)
mkdir -p "$OUT"
say() { echo "[device] $(date +%H:%M:%S) $*"; }
say "torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available())')"
if [ "${BENCH:-0}" = 1 ]; then
  "$PY" benchmarks/train_throughput.py --stacked --preset quick --device "$DEVICE" > "$OUT/bench_quick.txt" 2>&1 || true
  say "benchmark: $(tail -n 1 "$OUT/bench_quick.txt")"
fi
read -r -a ZSET <<< "${ZOO_SET:-}"
say "zoo train ($CONFIGS) on $DEVICE"
"${ICL[@]}" zoo train --config "$CONFIGS" --stacked --device "$DEVICE" --root "$OUT/zoo" --work "$OUT/zoo-train" \
  "${ZSET[@]}" > "$OUT/zoo_train.log" 2>&1
say "$(grep -c '^exported' "$OUT/zoo_train.log") models exported"
ACC_CONFIGS=${ACC_CONFIGS:-A,E,C}
if [ "${ACC_MINUTES:-0}" != 0 ]; then
  if [ "${ACC_FROM_REPO:-1}" = 1 ]; then  # continue the repository's runs (0: start afresh, e.g. a dry run)
    [ -d zoo_state ] && [ ! -d "$OUT/zoo_state" ] && cp -r zoo_state "$OUT/zoo_state"
    for c in ${ACC_CONFIGS//,/ }; do [ -d "zoo/$c" ] && [ ! -d "$OUT/zoo/$c" ] && cp -r "zoo/$c" "$OUT/zoo/$c"; done
  fi
  say "accumulating $ACC_CONFIGS for $ACC_MINUTES min on $DEVICE"
  "${ICL[@]}" zoo train --config "$ACC_CONFIGS" --minutes "$ACC_MINUTES" --device "$DEVICE" --jobs "${ACC_JOBS:-4}" \
    --root "$OUT/zoo" --state "$OUT/zoo_state" "${ZSET[@]}" > "$OUT/zoo_accumulate.log" 2>&1
  say "$(grep -c '^exported' "$OUT/zoo_accumulate.log") cool-downs exported"
fi
"${ICL[@]}" zoo cards --root "$OUT/zoo" > "$OUT/zoo_cards.log" 2>&1
"${ICL[@]}" zoo verify --root "$OUT/zoo"
if [ "${SKIP_PAPER:-0}" != 1 ]; then
  read -r -a PSET <<< "${PAPER_SET:-}"
  say "paper, one seed, ${PAPER_STEPS:-20000} steps"
  "${ICL[@]}" reproduce --preset paper --seeds 1 --device "$DEVICE" --out "$OUT/paper" \
    --set "train.steps=${PAPER_STEPS:-20000}" "${PSET[@]}" > "$OUT/paper.log" 2>&1
  say "paper done: $OUT/paper/report.md"
fi
say "done"
