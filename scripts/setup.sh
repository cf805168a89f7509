#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras.
# torch==2.13.0 is pinned first: on these machines it is a local CPU wheel; any
# requirement that only a newer torch satisfies would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log=$(mktemp)
pip_quiet() {  # pip is chatty about local index folders; show its output only when it fails
  if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2; return 1
  fi
}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU)" >&2
  pip_quiet torch==2.13.0
fi
echo "setup: installing engram-memory and its dependencies" >&2
pip_quiet -e '.[test]'
rm -f "$log"
