#!/usr/bin/env bash
# Set up, then run the main job on the embedded default: train the Engram-MoE model on the
# built-in corpus (the Python standard library), then generate a completion from it.
# Extra arguments go to `engram train` (e.g. --preset small --steps 600).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
preset=tiny
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = "--preset" ] && preset=${args[$((i + 1))]}
done
engram train --preset "$preset" "$@"
echo "---- engram generate --preset $preset --prompt 'def main():'"
engram generate --preset "$preset" --prompt "def main():" --max-new-tokens 100
