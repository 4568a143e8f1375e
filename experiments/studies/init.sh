#!/usr/bin/env bash
# Study 5 (initialisation and its recipe): normal vs orthogonal vs pca at the demo recipe
# (Adam lr 1e-3, 5% warm-up), then pca at lower learning rates and a longer warm-up, the recipes
# that may keep its head start, and pca without the clone loss (alpha 0), whose MSE terms start
# large when the student already matches the teacher's stream up to the rank. One seed: the
# differences measured so far are nats, not hundredths.
#   experiments/studies/init.sh [extra lrc-distill overrides]
source "$(dirname "$0")/_common.sh"
sweep init experiment=paper/fig3_lrc student.init=normal,orthogonal,pca "$@"
sweep init_pca_lr experiment=paper/fig3_lrc student.init=pca optim.lr=3e-5,1e-4,3e-4 "$@"
sweep init_pca_warmup experiment=paper/fig3_lrc student.init=pca optim.lr=1e-4,3e-4 optim.warmup_ratio=0.5 "$@"
sweep init_pca_alpha experiment=paper/fig3_lrc student.init=pca optim.lr=1e-4,3e-4 loss.alpha=0 "$@"
"$LRC_BIN/lrc-collect" "$SWEEPS/init" "$SWEEPS/init_pca_lr" "$SWEEPS/init_pca_warmup" "$SWEEPS/init_pca_alpha" \
    --out "$RESULTS/init" --group-by student.init,optim.lr,optim.warmup_ratio,loss.alpha
