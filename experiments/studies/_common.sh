# Shared by the study scripts (sourced, not run). The small scale every study uses on this 2-core CPU;
# a GPU user reruns a study at larger scale by passing overrides after the script name, which come
# last and so win, e.g.  experiments/studies/fig3.sh trainer=gpu trainer.max_steps=2000 data.seq_len=1024
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
LRC_BIN=${LRC_BIN:-.venv/bin}
SWEEPS=${SWEEPS:-multirun/studies}      # where the sweeps' run directories go (not committed)
RESULTS=${RESULTS:-experiments/results}  # where lrc-collect writes the tables and figures (committed)
# 40 optimizer steps of 4 x 128 tokens (20,480 training tokens), validation on the same 8 held-out
# sequences every 5 steps; checkpoints every 10 steps so an interrupted job loses little.
SCALE=(trainer.max_steps=40 trainer.val_check_interval=5 trainer.limit_val_batches=2 callbacks.checkpoint.every_n_train_steps=10
       logger=none ckpt_path=auto)
# ckpt_path=auto: a rerun skips finished jobs and resumes interrupted ones from their last checkpoint.
sweep() {  # sweep <name> <lrc-distill overrides...>: one resumable Hydra sweep into $SWEEPS/<name>
  local name=$1; shift
  "$LRC_BIN/lrc-distill" -m "${SCALE[@]}" "$@" hydra.sweep.dir="$SWEEPS/$name"
}
