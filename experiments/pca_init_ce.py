"""Held-out CE of the student before any training step, per projection init, on the real teacher.

    python experiments/pca_init_ce.py --rank 288 --inits normal,pca --val-sequences 32

The data is lrc-distill's default (the embedded corpus, 256-token sequences, the same validation
sequences in the same order; ``--val-sequences`` takes the first N of them). ``pca`` calibrates
on the first ``--calibration-sequences`` training sequences, as lrc-distill does. The CE is the
exported student's (a plain transformers model, so the teacher stream is not recomputed) next-token
CE over every validation token; the teacher's CE on the same tokens is printed beside it.
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lrc.cli.common import CONF_DIR
from lrc.losses import next_token_cross_entropy
from lrc.model import CloneConfig, LowRankClone
from lrc.teachers import load_teacher


@torch.no_grad()
def mean_ce(model: torch.nn.Module, ids: torch.Tensor, batch: int) -> float:
    """Next-token CE over all rows of ``ids`` (every row has the same length)."""
    total = 0.0
    for chunk in ids.split(batch):
        total += next_token_cross_entropy(model(chunk).logits, chunk).item() * chunk.shape[0]
    return total / ids.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=288)
    ap.add_argument("--inits", default="normal,pca")
    ap.add_argument("--val-sequences", type=int, default=32)
    ap.add_argument("--calibration-sequences", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=[f"seed={args.seed}"])
    teacher, tok = load_teacher("smollm2-135m-instruct", dtype="float32", cache_dir=cfg.paths.cache_dir)
    datamodule = instantiate(cfg.data)
    datamodule.set_tokenizer(tok)
    datamodule.prepare_data()
    datamodule.setup("fit")
    val = torch.stack([datamodule.val_dataset[i]["input_ids"] for i in datamodule.val_indices[: args.val_sequences]])
    calibration = datamodule.calibration_batch(args.calibration_sequences)
    print(f"validation: {tuple(val.shape)} token ids; calibration: {tuple(calibration.shape)}")

    start = time.perf_counter()
    print(f"teacher      CE {mean_ce(teacher, val, args.batch):.3f}  ({time.perf_counter() - start:.0f} s)")
    for init in args.inits.split(","):
        start = time.perf_counter()
        config = CloneConfig(rank=args.rank, init=init, seed=args.seed)
        clone = LowRankClone.from_teacher(teacher, config, tokenizer=tok, calibration_ids=calibration)
        student = clone.to_hf()
        ce = mean_ce(student, val, args.batch)
        print(f"{init:12s} CE {ce:.3f}  (rank {args.rank}, {time.perf_counter() - start:.0f} s)")
        del clone, student


if __name__ == "__main__":
    main()
