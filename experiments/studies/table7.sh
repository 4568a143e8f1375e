#!/usr/bin/env bash
# Study 3 (Table 7): attention and FFN projection sharing (All/All, IO/All, All/IO, IO/IO) at
# alpha 1, with the paper's clone terms for every cell; two seeds.
#   experiments/studies/table7.sh [extra lrc-distill overrides]
source "$(dirname "$0")/_common.sh"
sweep table7 seed=0,1 experiment=paper/table7_sharing "$@"
"$LRC_BIN/lrc-collect" "$SWEEPS/table7" --out "$RESULTS/table7" --group-by student.attn_sharing,student.ffn_sharing
