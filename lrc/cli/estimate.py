"""``lrc-estimate``: what an ``lrc-distill`` run with the same overrides will cost, before launch.

    lrc-estimate                                              # the embedded default
    lrc-estimate experiment=paper_lrc_1_5b trainer.devices=8  # the paper's LRC-1.5B on 8 GPUs
    lrc-estimate teacher=hub teacher.source=Qwen/Qwen2.5-3B-Instruct trainer=fsdp trainer.devices=4

Prints parameters (frozen, trainable, deployed), the strategy and precision, the micro-batch, FLOPs
per token (teacher forward, student forward and backward, weight products, clone terms) and memory
per device for each ``trainer.strategy.activation_checkpointing`` setting (off, full, student; the
configured one is marked). Everything is counted from the
teacher's config (:func:`lrc.teachers.teacher_config`): no weight is loaded or downloaded (a hub
teacher needs its ``config.json``).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from lrc.cli.common import CONF_DIR, ConfigError

GIB = 2**30


def compose(overrides: Sequence[str]) -> DictConfig:
    """The config ``lrc-distill`` would compose from the same overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("distill", overrides=list(overrides))


def strategy_of(trainer: DictConfig) -> tuple[str, int, str]:
    """("single" | "ddp" | "fsdp", devices, a note) for ``trainer``; ``devices: -1``/``auto`` is
    resolved on this machine when it can be, else taken as 1 with a note."""
    devices, note = trainer.get("devices", 1), ""
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        n = devices
    else:
        from lrc.training.plan import device_count

        try:
            n = device_count(trainer.get("accelerator", "auto"), devices)
        except ValueError:
            n, note = 1, f"trainer.devices={devices!r} resolves at launch; counted as 1 (set trainer.devices=N)"
    n *= int(trainer.get("num_nodes") or 1)
    strategy = trainer.get("strategy")
    text = str(OmegaConf.to_container(strategy) if OmegaConf.is_config(strategy) else strategy).lower()
    if n == 1:
        return "single", 1, note
    kind = "fsdp" if ("fsdp" in text or "modelparallel" in text) else "ddp"
    return kind, n, note


def estimate(cfg: DictConfig) -> dict[str, Any]:
    """The counts for a composed ``lrc-distill`` config (``ConfigError`` naming the key when it
    cannot be estimated)."""
    from lrc.estimate import (
        LossPlan, StudentPlan, TeacherShape, flops_per_token, memory_per_device, parameter_counts, precision_bytes,
    )
    from lrc.losses import LossConfig, LRCLoss
    from lrc.model import CloneConfig
    from lrc.model.checkpointing import checkpointing_mode
    from lrc.model.init import init_requires_untied_head
    from lrc.teachers import teacher_config
    from lrc.training.module import DEFAULT_METHOD

    target = OmegaConf.select(cfg, "method._target_") or DEFAULT_METHOD
    if target != DEFAULT_METHOD:
        raise ConfigError(f"lrc-estimate counts method=lrc, not method._target_={target}")
    plain = lambda key: OmegaConf.to_container(cfg[key], resolve=True)  # noqa: E731
    try:
        teacher_cfg = teacher_config(**plain("teacher"))
        student = CloneConfig(**plain("student"))
        student.validate_for(teacher_cfg)
        loss_cfg = LossConfig(**plain("loss"))
        shape = TeacherShape.from_config(teacher_cfg)
        kept = student.kept_layers(shape.layers)
        loss_fn = LRCLoss(loss_cfg)
        term_layers = loss_fn.check_layers(kept, shape.layers)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    tie = shape.tied if student.tie_head_projection is None else bool(student.tie_head_projection)
    if student.tie_head_projection is None and init_requires_untied_head(student.init):
        tie = False
    learned = loss_cfg.output_alignment == "learned"
    plan = StudentPlan(student.rank, tuple(kept), student.attn_sharing, student.ffn_sharing, tie, learned,
                       student.projection_path)
    terms = tuple(loss_fn.request.terms)
    loss_plan = LossPlan(terms, None if term_layers is None else len(term_layers), loss_cfg.attn_out_space,
                         loss_cfg.detach_down_target, loss_cfg.detach_o_target, learned)
    batch, seq_len = int(cfg.data.batch_size), int(cfg.data.seq_len)
    tokens = batch * seq_len
    strategy, devices, note = strategy_of(cfg.trainer)
    precision = str(cfg.trainer.get("precision", "32-true"))
    sizes = precision_bytes(precision, cfg.teacher.get("dtype", "float32"), student.param_dtype)
    try:
        checkpointing = checkpointing_mode(OmegaConf.select(cfg, "trainer.strategy.activation_checkpointing"))
    except ValueError as err:
        raise ConfigError(f"trainer.strategy.{err}") from None
    return {
        "teacher": cfg.teacher.source,
        "shape": shape,
        "rank": student.rank,
        "kept_layers": len(kept),
        "params": parameter_counts(shape, plan),
        "strategy": strategy,
        "devices": devices,
        "note": note,
        "precision": precision,
        "bytes": sizes,
        "micro_batch": batch,
        "seq_len": seq_len,
        "global_batch_size": cfg.get("global_batch_size"),
        "flops_per_token": flops_per_token(shape, plan, loss_plan, seq_len, tokens),
        "memory": memory_per_device(
            shape, plan, tokens_per_forward=tokens, strategy=strategy, devices=devices,
            teacher_bytes=sizes["teacher"], param_bytes=sizes["param"], compute_bytes=sizes["compute"],
            logit_chunk_size=loss_cfg.logit_chunk_size, loss=loss_plan,
        ),
        "checkpointing": checkpointing,
        "logit_chunk_size": loss_cfg.logit_chunk_size,
    }


def format_estimate(e: dict[str, Any]) -> str:
    s, p, f = e["shape"], e["params"], e["flops_per_token"]
    lines = [
        f"teacher      {e['teacher']} ({s.model_type}: {s.layers} layers, D={s.hidden}, {s.heads}/{s.kv_heads} heads "
        f"of {s.head_dim}, FFN {s.ffn}, vocab {s.vocab}{', tied head' if s.tied else ''})",
        f"student      rank {e['rank']}, {e['kept_layers']} layers",
        "parameters   frozen {frozen:,} | trainable {trainable:,} (projections {projections:,}, gains {gains:,}, "
        "alignments {alignments:,}) | deployed {deployed:,}".format(**p),
        f"strategy     {e['strategy']} on {e['devices']} device(s); precision {e['precision']} "
        f"(bytes: teacher {e['bytes']['teacher']}, trainable {e['bytes']['param']}, compute {e['bytes']['compute']})",
        f"micro-batch  {e['micro_batch']} x {e['seq_len']} = {e['micro_batch'] * e['seq_len']:,} tokens per forward"
        + (f"; global batch {e['global_batch_size']} sequences" if e["global_batch_size"] else ""),
        "FLOPs/token  total {:.3g} = teacher fwd {:.3g} + student fwd {:.3g} + student bwd {:.3g} + weight products "
        "{:.3g} + clone terms {:.3g}; unavoidable (teacher fwd + plain student step) {:.3g}, ratio {:.3f}".format(
            f["total"], f["teacher_forward"], f["student_forward"], f["student_backward"], f["weight_products"],
            f["clone_terms"], f["unavoidable"], f["total"] / f["unavoidable"]),
    ]
    for i, (mode, parts) in enumerate(e["memory"].items()):
        label = "memory/dev" if i == 0 else ""
        chosen = " (configured)" if mode == e["checkpointing"] else ""
        shown = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if k != "total")
        lines.append(f"{label:<13}{parts['total'] / GIB:.2f} GiB with activation_checkpointing={mode}{chosen}: {shown}")
    if not e["logit_chunk_size"]:
        lines.append("             logits unchunked: loss.logit_chunk_size=1024 keeps one chunk of them")
    if e["note"]:
        lines.append(f"note         {e['note']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        print(format_estimate(estimate(compose(argv))))
    except ConfigError as err:
        print(f"lrc-estimate: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bad override: Hydra's own message, on one line
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(err, (HydraException, OmegaConfBaseException)):
            print(f"lrc-estimate: error: {str(err).splitlines()[0]}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
