#!/usr/bin/env bash
# One core's queue of time-to-quality runs (benchmarks/time_to_quality.py), resumable:
# a finished recipe (convergence.json present) is skipped, an interrupted one continues. A finished
# recipe's curve and convergence test are copied to benchmarks/results/ttq/ (committed: runs/ is not),
# which is what scripts/ttq_report.py reads.
#   mkdir -p runs/ttq && nice -n 19 bash scripts/ttq_queue.sh A >> runs/ttq/queue-A.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
run() {  # name, then --set pairs
  local name=$1; shift
  local keep=benchmarks/results/ttq/$name
  [ -f "$keep/convergence.json" ] && { echo "$name: done"; return; }
  local sets=(); for kv in "$@"; do sets+=(--set "$kv"); done
  $PY benchmarks/time_to_quality.py --name "$name" --out runs/ttq "${sets[@]}" || return
  mkdir -p "$keep" && cp "runs/ttq/$name/ttq.csv" "runs/ttq/$name/convergence.json" "$keep/"
}
EI="model.mlp=false model.token_format=interleaved train.steps=16000"  # configuration E (issue 23)
case "${1:?queue A, BC, long, E1, E2, E3 SEED, A4 SEED or C4 SEED}" in
  E1)  # stop 23: what takes interleaved tokens (attention-only) off the plateau
    run E-lr1e-3-16k $EI train.lr=1e-3
    run E-lr4e-3-16k $EI train.lr=4e-3
    run E-cur-lr1e-3-w2k-16k $EI train.lr=1e-3 train.curriculum=true train.curriculum_d=true train.warmup_steps=2000
    ;;
  E3)  # stop 25: which recipe takes E's plateau seeds (2 and 3 under the zoo recipe) off it within 10k steps?
    k=${2:?E3 needs a seed}  # one seed per core: each recipe's pair of runs ends together
    EW="$EI train.schedule=wsd train.curriculum_d=true train.curriculum_ramp_steps=8000 train.steps=10000 seed=$k"
    run E3-lr2e-3-s$k $EW train.lr=2e-3
    run E3-d1-s$k $EW train.lr=1e-3 train.curriculum_start_frac=0.1
    run E3-nd-s$k $EW train.lr=1e-3 train.curriculum=true
    # both curricula took both seeds off the plateau by 5-6k steps; n and d (cheaper, short prompts early) is
    # E's recipe from stop 25: the same recipe with an MLP is configuration C's
    run C3-nd-s$k $EW train.lr=1e-3 train.curriculum=true model.mlp=true
    ;;
  A4)  # stop 26: A under E's exact recipe (wsd at 1e-3, the n-and-d curriculum, a 20% cool-down from 16k), so
    # that the format contrast A vs E differs in the token format alone; compared with A's cosine models at 16k
    k=${2:?A4 needs a seed}
    run A4-erecipe-s$k model.mlp=false train.steps=19200 train.cooldown_from=16000 train.schedule=wsd \
      train.lr=1e-3 train.curriculum=true train.curriculum_d=true train.curriculum_ramp_steps=8000 seed=$k
    ;;
  C4)  # stop 28: does C (interleaved, MLP) leave the plateau under E's recipe given longer, or from an easier start?
    k=${2:?C4 needs a seed}
    CW="model.mlp=true model.token_format=interleaved train.schedule=wsd train.lr=1e-3 train.curriculum=true"
    CW="$CW train.curriculum_d=true train.curriculum_ramp_steps=8000 seed=$k"
    run C4-d1-16k-s$k $CW train.steps=19200 train.cooldown_from=16000 train.curriculum_start_frac=0.1
    run C4-nd-32k-s$k $CW train.steps=38400 train.cooldown_from=32000  # E's recipe to its 32k cool-down
    ;;
  E2)
    run E-curd-lr1e-3-16k $EI train.lr=1e-3 train.curriculum_d=true
    run E-cur-lr2e-3-16k $EI train.lr=2e-3 train.curriculum=true train.curriculum_d=true
    run E-cur-b256-lr1e-3-8k $EI train.lr=1e-3 train.curriculum=true train.curriculum_d=true train.batch_size=256 train.steps=8000
    ;;
  A)
    run A-lr1e-3-16k train.steps=16000 train.lr=1e-3
    run A-b256-lr2e-3-8k train.steps=8000 train.lr=2e-3 train.batch_size=256
    run A-cur-lr2e-3-16k train.steps=16000 train.lr=2e-3 train.curriculum=true train.curriculum_d=true
    run A-lr4e-3-16k train.steps=16000
    ;;
  BC)
    run B-lr1e-3-16k train.steps=16000 train.lr=1e-3 model.mlp=true
    run C-cur-lr1e-3-16k train.steps=16000 train.lr=1e-3 model.mlp=true model.token_format=interleaved \
        train.curriculum=true train.curriculum_d=true
    run B-cur-lr2e-3-16k train.steps=16000 train.lr=2e-3 model.mlp=true train.curriculum=true train.curriculum_d=true
    ;;
  long)  # stop 22: does length alone converge A and B? (A ~50, B ~48 CPU minutes; stop 22 ran them side by side)
    run A-lr2e-3-128k train.steps=128000 train.lr=2e-3
    run B-lr1e-3-64k train.steps=64000 train.lr=1e-3 model.mlp=true
    ;;
esac
