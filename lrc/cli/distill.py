"""``lrc-distill``: compose the Hydra config, validate it, train, export, summarise.

    lrc-distill                                    # the embedded default (SmolLM2-135M, rank 288)
    lrc-distill student.rank=144 loss.alpha=0.5    # any key can be overridden
    lrc-distill -m student.rank=144,288 loss.alpha=0.2,0.5
    lrc-distill hydra.run.dir=runs/lrc/<run> ckpt_path=last   # resume
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lrc.cli.common import CONF_DIR, ConfigError, print_summary

RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.json")
EXPORT_DTYPES = (None, "float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------- validation
def check_static(cfg: DictConfig) -> tuple[Path, str | None]:
    """Checks that need no model or data; returns the output directory and the checkpoint to
    resume from (``None`` for a fresh run)."""
    t = cfg.trainer
    if not t.get("fast_dev_run"):
        steps = t.get("max_steps")
        if steps is None or int(steps) <= 0:
            raise ConfigError(f"trainer.max_steps must be a positive number of steps, got {steps!r}")
    from lrc.training.module import optim_settings

    try:
        optim_settings(cfg.optim)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.export.dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export.dtype must be one of {EXPORT_DTYPES}, got {cfg.export.dtype!r}")
    out = Path(cfg.paths.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    ckpt = cfg.ckpt_path
    if ckpt == "auto":
        ckpt = str(last) if last.is_file() else None
    elif ckpt == "last":
        if not last.is_file():
            raise ConfigError(f"ckpt_path=last but {last} does not exist")
        ckpt = str(last)
    elif ckpt is not None and not Path(ckpt).is_file():
        raise ConfigError(f"ckpt_path {ckpt!r} does not exist")
    if ckpt is None and out.exists() and any((out / m).exists() for m in RUN_MARKERS):
        raise ConfigError(
            f"output directory {out} already holds a run; resume it with ckpt_path=last "
            f"or choose another directory (hydra.run.dir=...)"
        )
    return out, ckpt


# ---------------------------------------------------------------------------------- build
def build_trainer(cfg: DictConfig, callbacks: list) -> Any:
    loggers = [instantiate_checked(c) for c in (cfg.get("logger") or [])]
    return instantiate_checked(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises the constructor's own ValueError /
    FileNotFoundError instead of Hydra's wrapper, so the user sees one clear message."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from None
        raise


def run(cfg: DictConfig) -> dict[str, Any]:
    """The whole job. Returns the summary dict (also written to ``metrics.json``)."""
    import lightning as L
    import torch

    from lrc.losses import LossConfig, LRCLoss
    from lrc.model import CloneConfig
    from lrc.teachers import load_teacher
    from lrc.training.callbacks import GracefulShutdown
    from lrc.training.module import DistillModule, NonFiniteLossError

    out, ckpt = check_static(cfg)
    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own lines
    container = OmegaConf.to_container(cfg, resolve=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    # the datamodule validates its sources (files exist, fields present) before anything heavy
    datamodule = instantiate_checked(cfg.data)
    teacher_kw = container["teacher"]
    teacher, tokenizer = load_teacher(**teacher_kw)
    max_len = int(getattr(teacher.config, "max_position_embeddings", 0) or 0)
    if max_len and int(cfg.data.seq_len) > max_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the teacher's maximum of {max_len} positions")
    clone_cfg = CloneConfig(**container["student"])
    clone_cfg.validate(teacher.config.hidden_size, teacher.config.num_hidden_layers)
    LRCLoss(LossConfig(**container["loss"])).check_layers(clone_cfg.kept_layers(teacher.config.num_hidden_layers))
    datamodule.set_tokenizer(tokenizer)

    module = DistillModule(
        teacher=teacher_kw,
        student=container["student"],
        loss=container["loss"],
        optim=container["optim"],
        log=container["log"],
        document_mask=bool(cfg.document_mask),
        teacher_model=teacher,
        tokenizer=tokenizer,
        run_config=container,
    )
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(container))

    callbacks = [instantiate_checked(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer = build_trainer(cfg, callbacks)
    shutdown = next((c for c in callbacks if isinstance(c, GracefulShutdown)), None)

    before: dict[str, float] = {}
    if cfg.validate_before and ckpt is None:
        before = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
    start = time.perf_counter()
    tokens_at_start = module.tokens_seen
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except NonFiniteLossError as err:
        raise ConfigError(f"training stopped: {err}") from None
    wall = time.perf_counter() - start
    summary: dict[str, Any] = {
        "run_dir": str(out.resolve()),
        "tokens_seen": int(module.tokens_seen),
        "steps": int(trainer.global_step),
        "wall_time_s": round(wall, 1),
        "tokens_per_s": round((module.tokens_seen - tokens_at_start) / max(wall, 1e-9), 1),
        "tokens_per_source": dict(module.tokens_per_source),
    }
    if shutdown is not None and shutdown.interrupted:
        summary["interrupted"] = True
        summary["checkpoint"] = str(shutdown.path)
        print(f"interrupted: checkpoint written to {shutdown.path}; resume with ckpt_path=last "
              f"hydra.run.dir={out}", file=sys.stderr)
        _write_json(out / "metrics.json", summary)
        return summary

    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    summary.update({
        "val_before": {k.removeprefix("val/"): round(v, 4) for k, v in before.items() if k.startswith("val/")},
        "val": {k.removeprefix("val/"): round(float(v), 4) for k, v in final.items() if k.startswith("val/")},
    })
    if cfg.export.enabled:
        dtype = getattr(torch, cfg.export.dtype) if cfg.export.dtype else None
        path = module.clone.save_student(out / "student", dtype=dtype, overwrite=True)
        summary["export_dir"] = str(path.resolve())
        summary["answer"] = greedy_answer(path, cfg.summary.prompt, int(cfg.summary.max_new_tokens))
        summary["prompt"] = cfg.summary.prompt
    _write_json(out / "metrics.json", summary)
    print_summary(summary)
    return summary


def greedy_answer(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Load the exported student like any transformers model and answer ``prompt`` greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    messages = [{"role": "user", "content": prompt}]
    if tok.chat_template:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
    tmp.replace(path)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="distill")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as err:
        if os.environ.get("LRC_DEBUG"):
            raise
        print(f"lrc-distill: error: {err}", file=sys.stderr)
        sys.exit(2)
    return (summary.get("val") or {}).get("ce")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
