#!/usr/bin/env bash
# Set up, then run the main job on the embedded default: `engram demo` starts a local Ray
# cluster, a 2-shard memory pool and a model worker, trains the `small` Engram-MoE on the
# built-in corpus (the Python standard library) through the sharded service with prefetch,
# generates a completion through the service and prints a summary.
# Extra arguments go to `engram demo` (e.g. --steps 300 --json --keep-serving).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/engram demo "$@"
