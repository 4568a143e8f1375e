"""LRC training throughput on one GPU: a randomly initialised Llama-3.2-3B-shaped teacher (28 layers,
D 3072, 24/8 heads, FFN 8192, vocab 128256, tied), rank 1536, 2048-token sequences, bf16, SDPA.

    python experiments/bench/gpu_throughput.py                    # micro-batches 1, 2, 3; both paths
    python experiments/bench/gpu_throughput.py --micro-batches 3 --paths auto --steps 4

For each micro-batch and projection path: tokens/s, TFLOP/s and MFU (FLOPs per token as
lrc-estimate counts them, peak from the device name) and peak GPU memory, with CE and KL in chunks
of 1024 positions (--logit-chunk-size). About 5-8 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import time

import torch

from lrc.estimate import LossPlan, StudentPlan, TeacherShape, flops_per_token
from lrc.losses import LossConfig, LRCLoss
from lrc.model import CloneConfig, LowRankClone
from lrc.training.callbacks import peak_tflops_for


def llama_3b(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=24,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
                      attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rank", type=int, default=1536)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--paths", nargs="+", default=["materialise", "factored"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    ap.add_argument("--logit-chunk-size", type=int, default=1024)
    args = ap.parse_args()

    torch.manual_seed(0)
    teacher = llama_3b(args.layers)
    peak = peak_tflops_for(torch.cuda.get_device_name())
    shape = TeacherShape.from_config(teacher.config)
    loss_fn = LRCLoss(LossConfig(alpha=0.2, logit_chunk_size=args.logit_chunk_size or None))
    print(f"device {torch.cuda.get_device_name()} (bf16 peak {peak} TFLOP/s); teacher {args.layers} layers; "
          f"rank {args.rank}; seq {args.seq_len}")
    print(f"{'micro-batch':>11} {'path':>11} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for path in args.paths:
        clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=args.rank, param_dtype="float32",
                                                               projection_path=path))
        opt = torch.optim.Adam([p for _, p in clone.named_trainable()], lr=1e-4, fused=True)
        for mb in args.micro_batches:
            ids = torch.randint(0, shape.vocab, (mb, args.seq_len), device="cuda")
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

            def step():
                opt.zero_grad(set_to_none=True)
                out = clone(ids, terms=loss_fn.request, logits=loss_fn.wants_logits)
                loss_fn(out, ids)["loss"].backward()
                opt.step()

            try:
                step()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
            except torch.OutOfMemoryError:
                print(f"{mb:>11} {path:>11} out of memory")
                opt.zero_grad(set_to_none=True)
                continue
            tps = mb * args.seq_len * args.steps / (time.perf_counter() - start)
            plan = StudentPlan(args.rank, tuple(range(args.layers)), projection_path=path)
            f = flops_per_token(shape, plan, LossPlan(), args.seq_len, mb * args.seq_len)["total"]
            tflops = tps * f / 1e12
            mfu = f"{tflops / peak:.1%}" if peak else "-"
            gib = torch.cuda.max_memory_allocated() / 2**30
            print(f"{mb:>11} {path:>11} {tps:>10,.0f} {tflops:>8.1f} {mfu:>6} {gib:>9.1f}", flush=True)
        del clone, opt


if __name__ == "__main__":
    main()
