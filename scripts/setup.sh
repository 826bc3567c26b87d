#!/usr/bin/env bash
# Create .venv (if needed) and install icl-heads; `setup.sh test` adds the test extras (pytest,
# hypothesis, TransformerLens: about 60 s more on a fresh machine, which the main job does not need).
# torch is pinned to 2.13.0 first: these machines hold its CPU wheel locally, and an
# unpinned "torch" would pull a multi-GB CUDA build. Set ICL_TORCH to override.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") TARGET="." ;;
  test) TARGET=".[test]" ;;
  *) echo "setup.sh: unknown argument '$1' (expected nothing or 'test')" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${ICL_TORCH:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$TARGET" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import icl_heads, torch; print('icl-heads ready; torch', torch.__version__)"
