"""``lrc-sft``: supervised fine-tuning of a plain causal LM on chat data (Hydra config ``conf/sft.yaml``).

    lrc-sft model.source=runs/lrc/<run>/student              # one epoch of the embedded dialogues
    lrc-sft model.source=<dir or hub id> data=chat_ultrachat_200k
    lrc-sft hydra.run.dir=runs/sft/<run> ckpt_path=last      # resume

It shares lrc-distill's checks and machinery (:mod:`lrc.cli.distill`): unknown keys and bad numbers
are refused before anything is read, the run directory is locked, checkpoints are atomic and
NaN-safe, a resume continues exactly, and the result is a plain model directory written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lrc.cli.common import CONF_DIR, ConfigError, lock_run_dir, run_command

#: Model dtypes ``model.dtype`` and ``export.dtype`` take.
DTYPES = ("float32", "bfloat16", "float16")


def check_settings(cfg: DictConfig) -> None:
    """Checks of the settings alone, before anything is read or written."""
    from lrc.cli.checks import check_config
    from lrc.cli.distill import check_accelerator
    from lrc.training.module import optim_settings
    from lrc.training.sft import SFT_OPTIM

    check_config(cfg, CONF_DIR, "sft")
    t = cfg.trainer
    if not t.get("fast_dev_run"):
        steps, epochs = t.get("max_steps"), t.get("max_epochs")
        if not ((steps is not None and int(steps) > 0) or (epochs is not None and int(epochs) > 0)):
            raise ConfigError(f"the run has no length: set trainer.max_steps > 0 or trainer.max_epochs > 0 "
                              f"(got {steps!r} and {epochs!r})")
    try:
        optim_settings({**SFT_OPTIM, **OmegaConf.to_container(cfg.optim, resolve=True)})
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not cfg.model.source:
        raise ConfigError("model.source is required: a local model directory (an lrc-distill export) or a hub id")
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {DTYPES}, got {cfg.model.dtype!r}")
    if cfg.export.dtype not in (None, *DTYPES):
        raise ConfigError(f"export.dtype must be one of {(None, *DTYPES)}, got {cfg.export.dtype!r}")
    check_accelerator(t)
    from lrc.training.eval_callback import check_eval_callbacks

    check_eval_callbacks(cfg)  # callbacks.eval: its tasks and task files, before any work


def check_model(cfg: DictConfig) -> Any:
    """The model's config and tokenizer, read before any weight: a missing model, a tokenizer
    without a chat template, a ``data.seq_len`` above the model's context are refused here."""
    from transformers import AutoConfig, AutoTokenizer

    source = str(cfg.model.source)
    local = os.path.sep in source or source.startswith(".") or Path(source).exists()
    if local and not (Path(source) / "config.json").is_file():
        raise ConfigError(f"model.source={source!r}: no model directory there (no config.json)")
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.source={source!r} cannot be loaded: {str(err).splitlines()[0]}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.source={source!r}: its tokenizer has no chat template; lrc-sft renders "
                          f"conversations with it")
    max_len = int(getattr(config, "max_position_embeddings", 0) or 0)
    if max_len and int(cfg.data.seq_len) > max_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's maximum of {max_len} positions")
    return tokenizer


def check_resume(cfg: DictConfig, ckpt: str) -> None:
    """The checkpoint must be readable, an lrc-sft one, and written for the same model."""
    from lrc.training.checkpoint_io import load_checkpoint

    extra = load_checkpoint(ckpt, mmap=True).get("lrc") or {}
    if not str(extra.get("method_target", "")).endswith("SFTModule"):
        raise ConfigError(f"cannot resume from {ckpt}: it is not an lrc-sft checkpoint")
    was = OmegaConf.select(OmegaConf.create(extra.get("config") or {}), "model.source")
    if was != cfg.model.source:
        raise ConfigError(f"cannot resume from {ckpt}: it fine-tunes model.source={was!r}, not {cfg.model.source!r}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """The whole job; returns the summary dict (also written to ``metrics.json``)."""
    check_settings(cfg)
    tokenizer = check_model(cfg)
    with lock_run_dir(Path(cfg.paths.output_dir), "lrc-sft"):
        return _run(cfg, tokenizer)


def _run(cfg: DictConfig, tokenizer: Any) -> dict[str, Any]:
    import lightning as L
    import torch

    from lrc.cli.distill import _write_json, check_static, greedy_answer, instantiate_checked, run_identity
    from lrc.cli.fit import train
    from lrc.training.sft import SFTModule, load_causal_lm

    out, ckpt = check_static(cfg, resume_check=check_resume, command="lrc-sft")
    container = OmegaConf.to_container(cfg, resolve=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate_checked(cfg.data)
    datamodule.set_tokenizer(tokenizer)
    datamodule.check_data()  # bad rows, too little data for a batch, no validation: before the weights load
    model, tokenizer = load_causal_lm(str(cfg.model.source), str(cfg.model.dtype))
    module = SFTModule(model=str(cfg.model.source), dtype=str(cfg.model.dtype), optim=container["optim"],
                       model_obj=model, tokenizer=tokenizer, run_config=container)
    fit = train(cfg, module, datamodule, out, ckpt, container)
    summary: dict[str, Any] = {
        "status": "finished", **run_identity(cfg, "sft"), "model": str(cfg.model.source),
        **fit.throughput(module), "wall_time_total_s": fit.total_wall(), "data": datamodule.stats,
    }
    if fit.stopped(summary):
        return summary
    summary.update(fit.validation(module, datamodule))
    if cfg.export.enabled:
        dtype = getattr(torch, cfg.export.dtype) if cfg.export.dtype else None
        path = module.save_model(out / "model", dtype=dtype, overwrite=True)
        summary["export_dir"] = str(path.resolve())
        summary["prompt"] = cfg.summary.prompt
        summary["answer"] = greedy_answer(path, cfg.summary.prompt, int(cfg.summary.max_new_tokens))
    _write_json(out / "metrics.json", summary)
    print_sft_summary(summary)
    return summary


def print_sft_summary(summary: dict[str, Any]) -> None:
    """A few lines: tokens, steps, validation CE before and after, where the model went."""
    val, before = summary.get("val") or {}, summary.get("val_before") or {}
    lines = [f"lrc-sft: {summary['tokens_seen']:,} labelled tokens in {summary['steps']} steps, "
             f"{summary['wall_time_s']:.1f} s",
             f"  held-out CE (assistant tokens): {val.get('ce', float('nan')):.3f}"
             + (f" (before {before['ce']:.3f})" if "ce" in before else ""),
             f"  run directory: {summary['run_dir']}", f"  model: {summary.get('export_dir', '-')}"]
    if "answer" in summary:
        lines.append(f"  {summary['prompt']} -> {summary['answer']!r}")
    print("\n".join(lines))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sft")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One job: a bad input or a stopped run prints ``lrc-sft: error: ...`` and exits with 2."""
    summary = run_command("lrc-sft", run, cfg)
    return (summary.get("val") or {}).get("ce")


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
