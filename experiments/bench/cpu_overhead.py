"""One LRC training step against the unavoidable work on the same tokens, side by side in one process.

    python experiments/bench/cpu_overhead.py                       # SmolLM2-135M, rank 288, 4 x 256
    python experiments/bench/cpu_overhead.py --teacher tiny-llama --rank 16 --batch 2 --seq-len 64
    python experiments/bench/cpu_overhead.py --checkpointing off full student   # + the recomputation's cost

The unavoidable work is a teacher forward without gradient plus one training step (forward,
backward, Adam update) of a plain student of the exported shape. The LRC step is the clone's
forward with the configured loss, its backward and the same Adam update. Prints the median wall
times (measured in turns, so a change of load reaches all three alike), their ratio, and beside it
the FLOP floor of that ratio for the configured loss (weight products W_t @ P forward and
backward and the clone terms' extra products over the same unavoidable work,
:func:`lrc.estimate.flops_per_token`): a ratio near the floor means the clone adds no overhead
beyond the arithmetic it must do. With ``--checkpointing``, one LRC step per activation-checkpointing
setting (:mod:`lrc.model.checkpointing`) is timed in the same turns; the floor counts no recomputation.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from lrc.estimate import LossPlan, StudentPlan, TeacherShape, flops_per_token
from lrc.losses import LossConfig, LRCLoss
from lrc.methods.kd import KDModel
from lrc.model import CloneConfig, LowRankClone
from lrc.model.checkpointing import CHECKPOINTING_MODES, apply_activation_checkpointing
from lrc.teachers import load_teacher
from lrc.training.distributed import sharding_units


def timed_round_robin(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function, measured in turns (one of each per round, after one
    warm-up round), so that a change in the machine's load during the run reaches all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m-instruct", help="load_teacher source (tiny-llama for a quick check)")
    ap.add_argument("--rank", type=int, default=288)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--projection-path", default="auto", choices=("auto", "materialise", "factored"))
    ap.add_argument("--logit-chunk-size", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--checkpointing", nargs="+", default=["off"], choices=list(CHECKPOINTING_MODES),
                    help="time the LRC step under each of these activation-checkpointing settings")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher, tok = load_teacher(args.teacher, dtype="float32")
    config = CloneConfig(rank=args.rank, projection_path=args.projection_path)
    loss_fn = LRCLoss(LossConfig(alpha=args.alpha, logit_chunk_size=args.logit_chunk_size or None))
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    def lrc_step(checkpointing: str):
        """One clone per setting (the teacher's tensors are shared, not copied) and its Adam."""
        clone = LowRankClone.from_teacher(teacher, config, tokenizer=tok)
        loss_fn.check_layers(clone.student_layers, clone.arch.num_layers)
        apply_activation_checkpointing(sharding_units(clone), checkpointing)
        opt = torch.optim.Adam([p for _, p in clone.named_trainable()], lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            out = clone(ids, terms=loss_fn.request, logits=loss_fn.wants_logits)
            loss_fn(out, ids)["loss"].backward()
            opt.step()

        return clone, step

    steps = {}
    for mode in dict.fromkeys(args.checkpointing):
        clone, steps["LRC step" if mode == "off" else f"LRC step, checkpointing {mode}"] = lrc_step(mode)

    def teacher_forward():
        with torch.no_grad():
            teacher(ids)

    plain = KDModel.from_teacher(teacher, rank=args.rank, kept_layers=clone.student_layers,
                                 tie_word_embeddings=clone.io.student_tied).student
    plain_opt = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        plain(ids, labels=ids).loss.backward()
        plain_opt.step()

    times = timed_round_robin({"teacher forward (no grad)": teacher_forward, "plain student step": plain_step,
                               **steps}, args.repeats)
    for name, t in times.items():
        print(f"{name:36s} {t:8.3f} s")
    unavoidable = times["teacher forward (no grad)"] + times["plain student step"]

    shape = TeacherShape.from_config(teacher.config)
    plan = StudentPlan(args.rank, tuple(clone.student_layers), config.attn_sharing, config.ffn_sharing,
                       clone.io.proj_head is None, False, args.projection_path)
    f = flops_per_token(shape, plan, LossPlan(terms=loss_fn.request.terms), args.seq_len, args.batch * args.seq_len)
    floor = f["total"] / f["unavoidable"]
    for name in steps:
        ratio = times[name] / unavoidable
        print(f"ratio {name} / (teacher forward + plain student step) = {ratio:.2f}   FLOP floor {floor:.2f}   "
              f"({abs(100 * (ratio / floor - 1)):.0f}% {'above' if ratio >= floor else 'below'} the floor)")
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")  # KiB on Linux


if __name__ == "__main__":
    main()
