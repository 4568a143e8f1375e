#!/usr/bin/env bash
# Study 2 (Table 3): drop one clone term at a time (separate Pq, Pk, Pv); two seeds. A dict override
# merges into loss.term_weights and {} leaves every term on. 20 steps (10,240 training tokens) rather
# than the other studies' 40, so that its 16 jobs fit in under an hour on 2 CPU cores.
#   experiments/studies/table3.sh [extra lrc-distill overrides]
source "$(dirname "$0")/_common.sh"
sweep table3 seed=0,1 experiment=paper/table3_base 'loss.term_weights={},{q:0},{k:0},{v:0},{o:0},{gate:0},{up:0},{down:0}' trainer.max_steps=20 "$@"
"$LRC_BIN/lrc-collect" "$SWEEPS/table3" --out "$RESULTS/table3"
