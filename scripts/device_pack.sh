#!/usr/bin/env bash
# Pack a device run (scripts/device_paper.sh SRC) into at most 8 files of < 16 MiB in DEST, the shape a
# lent machine's $OUT can return: results (no weights), the paper h=min/h=max checkpoints of the first
# seed, and the quick-long sweep's checkpoints (no optimizer state, snapshots or stack state), split.
#
#   scripts/device_pack.sh SRC DEST
set -uo pipefail
SRC=${1:?usage: device_pack.sh SRC DEST}
DEST=${2:?usage: device_pack.sh SRC DEST}
mkdir -p "$DEST"
tar -C "$SRC" -czf "$DEST/results.tar.gz" --exclude='*.safetensors' --exclude='snapshots' --exclude='stacks' .
models="$SRC/paper/seed0/e1/models"
if [[ -d "$models" ]]; then
  hs=$(ls "$models" | grep '^h[0-9]*$' | sort -t h -k 2 -n)
  for h in $(echo "$hs" | head -n 1) $(echo "$hs" | tail -n 1); do
    [[ -e "$DEST/paper_$h.tar" ]] || tar -C "$SRC" -cf "$DEST/paper_$h.tar" --exclude='state.safetensors' \
      --exclude='snapshots' "paper/seed0/e1/models/$h"
  done
fi
if [[ -d "$SRC/quick-long" ]]; then
  (cd "$SRC" && find quick-long -name model.safetensors -not -path '*/snapshots/*' -not -path '*/stacks/*' \
     -printf '%h\n' | sort | xargs -I D find D -maxdepth 1 -type f ! -name state.safetensors) \
    | tar -C "$SRC" -czf - -T - | split -b 15M -d -a 1 - "$DEST/quick_long_models.tar.gz.part"
fi
ls -la "$DEST"
