"""LRC training throughput on one GPU: a randomly initialised Llama-3.2-3B-shaped teacher (28 layers,
D 3072, 24/8 heads, FFN 8192, vocab 128256, tied), rank 1536 (the LRC-1.5B shape), 2048-token
sequences, bf16 compute with fp32 master projections, SDPA attention, fused Adam.

    python experiments/bench/gpu_throughput.py                          # the full grid, ~5 minutes
    python experiments/bench/gpu_throughput.py --micro-batches 8 --paths auto --checkpointing student
    python experiments/bench/gpu_throughput.py --device cpu --layers 1 --seq-len 64 --micro-batches 1  # smoke

For each projection path x activation checkpointing x micro-batch: tokens/s, TFLOP/s and MFU (FLOPs
per token as lrc-estimate counts them; recomputation under checkpointing is not counted, as usual for
MFU) and peak memory. Checkpointing (``lrc.model.checkpointing``): "off", "full" (each clone layer
recomputed whole in backward, teacher included) or "student" (the teacher layer runs once and keeps
its clone-term targets; only the student stream is recomputed). ``--memory-cap-gib 80`` caps the process at 80 GiB
(``torch.cuda.set_per_process_memory_fraction``), so on a bigger card the grid shows what fits on an
80 GB H100; a setting that does not fit prints "out of memory" and the grid goes on. The measured
bf16 matrix-product rate (8192^3) is printed beside the datasheet peak, as the ceiling MFU is read
against. ``--out FILE`` also writes every row as JSON. ``--budget-s`` stops starting new settings
once that much time has passed, so the run fits a short allocation.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from lrc.estimate import LossPlan, StudentPlan, TeacherShape, flops_per_token
from lrc.losses import LossConfig, LRCLoss
from lrc.model import CloneConfig, LowRankClone
from lrc.model.checkpointing import CHECKPOINTING_MODES, apply_activation_checkpointing
from lrc.training.callbacks import peak_tflops_for
from lrc.training.distributed import sharding_units


def llama_3b(layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=24,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
                      attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def measured_matmul_tflops(device: str) -> float | None:
    """bf16 8192^3 products, mean of 10 after 3 warm-ups (the ceiling this card reaches here)."""
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rank", type=int, default=1536)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    ap.add_argument("--paths", nargs="+", default=["materialise", "factored"], choices=["auto", "materialise", "factored"])
    ap.add_argument("--checkpointing", nargs="+", default=["off", "full", "student"], choices=list(CHECKPOINTING_MODES),
                    help="activation checkpointing of every clone decoder layer (lrc.model.checkpointing)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    ap.add_argument("--logit-chunk-size", type=int, default=1024)
    ap.add_argument("--memory-cap-gib", type=float, default=None, help="cap this process's GPU memory (e.g. 80)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new setting after this many seconds")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    t0 = time.perf_counter()

    torch.manual_seed(0)
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    if dev == "cuda" and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    peak = peak_tflops_for(name) if dev == "cuda" else None
    matmul = measured_matmul_tflops(dev)
    teacher = llama_3b(args.layers, dev)
    shape = TeacherShape.from_config(teacher.config)
    loss_fn = LRCLoss(LossConfig(alpha=0.2, logit_chunk_size=args.logit_chunk_size or None))
    header = {"device": name, "torch": torch.__version__, "datasheet_bf16_tflops": peak,
              "measured_matmul_bf16_tflops": None if matmul is None else round(matmul, 1),
              "layers": args.layers, "rank": args.rank, "seq_len": args.seq_len,
              "memory_cap_gib": args.memory_cap_gib, "logit_chunk_size": args.logit_chunk_size}
    print(json.dumps(header))
    print(f"{'micro-batch':>11} {'path':>11} {'ckpt':>7} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak GiB':>9} {'loss':>8}", flush=True)
    rows = []
    for path in args.paths:
        for ckpt in args.checkpointing:
            clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=args.rank, param_dtype="float32",
                                                                   projection_path=path))
            apply_activation_checkpointing(sharding_units(clone), ckpt)
            opt = torch.optim.Adam([p for _, p in clone.named_trainable()], lr=1e-4, fused=dev == "cuda")
            for mb in args.micro_batches:
                row = {"micro_batch": mb, "path": path, "checkpointing": ckpt}
                if time.perf_counter() - t0 > args.budget_s:
                    row["status"] = "skipped (budget)"
                    print(f"{mb:>11} {path:>11} {ckpt:>7} skipped: --budget-s reached", flush=True)
                    rows.append(row)
                    continue
                ids = torch.randint(0, shape.vocab, (mb, args.seq_len), device=dev)
                if dev == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                losses = []

                def step():
                    opt.zero_grad(set_to_none=True)
                    out = clone(ids, terms=loss_fn.request, logits=loss_fn.wants_logits)
                    loss = loss_fn(out, ids)["loss"]
                    loss.backward()
                    opt.step()
                    losses.append(loss.detach())

                oom = False
                try:
                    step()
                    sync(dev)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    sync(dev)
                    seconds = time.perf_counter() - start
                except torch.OutOfMemoryError:
                    oom = True
                if oom:
                    opt.zero_grad(set_to_none=True)
                    losses.clear()
                    gc.collect()
                    torch.cuda.empty_cache()
                    row["status"] = "out of memory"
                    print(f"{mb:>11} {path:>11} {ckpt:>7} out of memory", flush=True)
                    rows.append(row)
                    continue
                tps = mb * args.seq_len * args.steps / seconds
                plan = StudentPlan(args.rank, tuple(range(args.layers)), projection_path=path)
                f = flops_per_token(shape, plan, LossPlan(), args.seq_len, mb * args.seq_len)["total"]
                tflops = tps * f / 1e12
                gib = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
                row.update(status="ok", tokens_per_s=round(tps), tflops=round(tflops, 1), flops_per_token=f,
                           mfu=None if not peak else round(tflops / peak, 4), peak_gib=round(gib, 1),
                           last_loss=round(float(losses[-1]), 4), seconds_per_step=round(seconds / args.steps, 3))
                mfu = f"{tflops / peak:.1%}" if peak else "-"
                print(f"{mb:>11} {path:>11} {ckpt:>7} {tps:>10,.0f} {tflops:>8.1f} {mfu:>6} {gib:>9.1f} "
                      f"{row['last_loss']:>8.3f}", flush=True)
                rows.append(row)
            del clone, opt
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({**header, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
