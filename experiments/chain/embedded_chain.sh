#!/usr/bin/env bash
# The embedded chain end to end (issue 9): lrc-pipeline (distill -> export -> SFT -> evaluate) on the
# real teacher and the embedded data, then the offline evaluation of the distilled student before
# SFT, then one greedy chat answer from the teacher, the distilled student and the SFT student.
# Resumable: rerunning with the same ROOT skips every complete stage.
#   experiments/chain/embedded_chain.sh                      # ROOT=runs/pipeline/embedded_chain
#   ROOT=runs/pipeline/x experiments/chain/embedded_chain.sh 'distill=["trainer.max_steps=50"]'
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
LRC_BIN=${LRC_BIN:-.venv/bin}
ROOT=${ROOT:-runs/pipeline/embedded_chain}
PROMPT=${PROMPT:-What is the capital of France?}
"$LRC_BIN/lrc-pipeline" hydra.run.dir="$ROOT" "$@"
[ -f "$ROOT/eval_before_sft/results.json" ] ||
    "$LRC_BIN/lrc-eval" model="$ROOT/distill/student" hydra.run.dir="$ROOT/eval_before_sft"
"$LRC_BIN/python" - "$ROOT" "$PROMPT" <<'PY'
import sys
from pathlib import Path

from lrc.cli.distill import greedy_answer
from lrc.teachers import SMOLLM2_NAME, teacher_directory

root, prompt = Path(sys.argv[1]), sys.argv[2]
for name, model_dir in (("teacher", teacher_directory(SMOLLM2_NAME)), ("distilled student", root / "distill" / "student"),
                        ("SFT student", root / "sft" / "model")):
    print(f"{name:18s} {prompt!r} -> {greedy_answer(model_dir, prompt, 24)!r}")
PY
