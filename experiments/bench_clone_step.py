"""Time one clone forward+backward on the real teacher, side by side with the teacher alone.

    python experiments/bench_clone_step.py --rank 288 --batch 4 --seq-len 256

Prints the loss components for a fixed seed, the wall time of each variant (median of
``--repeats``), their ratios, and the process's peak resident memory after each phase.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from lrc.losses import LossConfig, LRCLoss
from lrc.model import CloneConfig, LowRankClone
from lrc.teachers import load_teacher


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=288)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.2)
    args = ap.parse_args()

    teacher, tok = load_teacher("smollm2-135m-instruct", dtype="float32")
    print(f"after teacher load: peak RSS {peak_rss_gib():.2f} GiB")
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=args.rank, seed=args.seed), tokenizer=tok)
    loss_fn = LRCLoss(LossConfig(alpha=args.alpha))
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq_len), generator=g)

    terms = loss_fn(clone(ids, terms=loss_fn.request), ids)
    print("loss components (seed %d, random token ids, rank %d):" % (args.seed, args.rank))
    for k in ["loss", "ce", "kl", "clone"] + [f"clone/{t}" for t in loss_fn.request.terms]:
        print(f"  {k:12s} {terms[k].item():.6f}")
    del terms

    def clone_step():
        clone.zero_grad(set_to_none=True)
        loss_fn(clone(ids, terms=loss_fn.request), ids)["loss"].backward()

    def teacher_fwd():
        with torch.no_grad():
            teacher(ids)

    student = clone.to_hf()
    for p in student.parameters():
        p.requires_grad_(True)

    def student_step():
        student.zero_grad(set_to_none=True)
        student(ids, labels=ids).loss.backward()

    results = {}
    for name, fn in [("teacher forward", teacher_fwd), ("plain student fwd+bwd", student_step),
                     ("clone fwd+bwd (LRC step)", clone_step)]:
        fn()  # warm-up
        results[name] = timed(fn, args.repeats)
        print(f"{name:26s} {results[name]:7.2f} s   peak RSS so far {peak_rss_gib():.2f} GiB")
    base = results["clone fwd+bwd (LRC step)"]
    tokens = args.batch * args.seq_len
    print(f"clone step: {tokens / base:.0f} tokens/s; "
          f"ratio to teacher forward {base / results['teacher forward']:.2f}x, "
          f"to a plain same-size student step {base / results['plain student fwd+bwd']:.2f}x")


if __name__ == "__main__":
    main()
