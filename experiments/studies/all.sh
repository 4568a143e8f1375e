#!/usr/bin/env bash
# Every small-scale study, most informative first; rerun to continue after an interruption
# (finished jobs are skipped). A log per study goes to $SWEEPS/<study>.log.
set -uo pipefail
here=$(dirname "$0")
SWEEPS=${SWEEPS:-multirun/studies}; mkdir -p "$SWEEPS"; export SWEEPS
for study in fig3 init table7 table3; do
  echo "$(date -u +%FT%TZ) study $study: start"
  bash "$here/$study.sh" "$@" > "$SWEEPS/$study.log" 2>&1
  echo "$(date -u +%FT%TZ) study $study: exit $?"
done
