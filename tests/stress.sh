#!/usr/bin/env bash
# The 2-rank and Slurm tiers with a CPU hog beside them: N busy processes (default: one per core)
# compete for the cores for the whole run, as other jobs do on a shared CI machine.
#
#   tests/stress.sh [N] [extra pytest arguments]        e.g.  sudo tests/stress.sh 2 -x
#
# The Slurm tier needs root (it is skipped otherwise). The hogs are this script's own children,
# stopped by their pids when it exits. Prints the hog count, pytest's exit code and the wall time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
N=${1:-$(nproc)}
shift $(( $# > 0 ? 1 : 0 ))

hogs=()
stop_hogs() { ((${#hogs[@]})) && kill "${hogs[@]}" 2>/dev/null; wait "${hogs[@]}" 2>/dev/null; hogs=(); }
trap stop_hogs EXIT
for _ in $(seq 1 "$N"); do "$PY" -c 'while True: pass' & hogs+=($!); done

start=$(date +%s)
"$PY" -m pytest -m "dist or slurm" -p no:cacheprovider -q "$@"
rc=$?
stop_hogs
echo "stress.sh: $N CPU hog(s) beside the dist and slurm tiers: pytest exit code $rc after $(( $(date +%s) - start )) s"
exit $rc
