#!/usr/bin/env bash
# Study 1 (Figure 3's ordering) and study 4 (token efficiency): LRC vs vanilla KD vs TinyBERT-style
# vs LRC without clone loss, at equal tokens, data order and optimizer; two seeds. Seeds vary
# slowest, so an interrupted study has whole seeds done. Token efficiency is read off the same
# curves: the tokens `kd` needs to reach the CE LRC reaches after N tokens (--baseline).
#   experiments/studies/fig3.sh [extra lrc-distill overrides]
source "$(dirname "$0")/_common.sh"
sweep fig3 seed=0,1 experiment=paper/fig3_lrc,paper/fig3_kd,paper/fig3_tinybert,paper/fig3_no_clone "$@"
"$LRC_BIN/lrc-collect" "$SWEEPS/fig3" --out "$RESULTS/fig3" --baseline experiment=paper/fig3_kd
