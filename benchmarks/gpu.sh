#!/usr/bin/env bash
# The prepared GPU check (issue 15): one JSON file of throughput, loop efficiency,
# packing speed-up, peak memory, the card's name and the projected seed-report study.
#
#   bash benchmarks/gpu.sh [OUT.json]             # one H100/H200, under 8 minutes
#   bash benchmarks/gpu.sh --dry-run OUT.json     # the CPU, toy sizes, seconds
#
# OUT.json defaults to $OUT/gpu.json. It installs and sets up nothing: it runs
# benchmarks/gpu_check.py with $PYTHON if set, else the repository's .venv if there
# is one, else the python3 on PATH, with this checkout first on PYTHONPATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x "$root/.venv/bin/python" ]]; then
    py="$root/.venv/bin/python"
else
    py="$(command -v python3 || command -v python)"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$root/benchmarks/gpu_check.py" "$@"
