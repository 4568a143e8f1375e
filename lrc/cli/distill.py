"""``lrc-distill``: compose the Hydra config, validate it, train, export, summarise.

    lrc-distill                                    # the embedded default job (experiment=demo)
    lrc-distill student.rank=144 loss.alpha=0.5    # any key can be overridden
    lrc-distill -m student.rank=144,288 loss.alpha=0.2,0.5
    lrc-distill experiment=paper/fig3_kd           # a baseline (conf/method/*.yaml) on the embedded teacher
    lrc-distill hydra.run.dir=runs/lrc/<run> ckpt_path=last   # resume
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lrc.cli.common import CONF_DIR, USER_ERRORS, ConfigError, is_rank_zero, lock_run_dir, print_summary

EXPORT_DTYPES = (None, "float32", "bfloat16", "float16")
#: What a start that never reached a checkpoint may have left; set aside when the directory is reused.
LEFTOVERS = ("config.yaml", "checkpoints", "csv", "tensorboard", "curves.csv", "error.txt")
#: Settings a resume must keep: they fix the method, the teacher and the shapes of the trainable tensors.
RESUME_KEYS = (
    "method._target_", "teacher.source", "teacher.tiny", "student.rank", "student.attn_sharing", "student.ffn_sharing",
    "student.tie_head_projection", "student.layers", "student.layer_stride", "student.param_dtype",
)


# ----------------------------------------------------------------------------- validation
def check_settings(cfg: DictConfig) -> None:
    """Checks of the settings alone, before any file is read or written: every key is one lrc
    reads and every number a number (:mod:`lrc.cli.checks`), the run has steps, the optimizer and
    export settings are valid, and the accelerator exists on this machine."""
    from lrc.cli.checks import check_config

    check_config(cfg, CONF_DIR)
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
    check_accelerator(t)
    from lrc.training.eval_callback import check_eval_callbacks

    check_eval_callbacks(cfg)  # callbacks.eval: its tasks and task files, before any work


def check_accelerator(t: DictConfig) -> None:
    """``trainer=gpu`` on a machine without a CUDA GPU fails here, not inside Lightning."""
    accelerator = str(t.get("accelerator") or "auto")
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    visible = torch.cuda.device_count()
    if visible == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but torch sees no CUDA GPU on this machine; use trainer=cpu"
        )
    devices = t.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > visible:
        raise ConfigError(f"trainer.devices={devices} but only {visible} CUDA GPU(s) are visible")


def check_teacher_fit(cfg: DictConfig) -> None:
    """Check ``data.seq_len`` and, through the method's ``check_settings``, the student and loss
    settings (for lrc: rank range, a rank transformers can export, kept layers, clone-term layers)
    against the teacher's config alone (:func:`lrc.teachers.teacher_config`): no weight is loaded,
    downloaded or converted and nothing is written."""
    from lrc.teachers import teacher_config
    from lrc.training.module import method_class

    teacher = teacher_config(**OmegaConf.to_container(cfg.teacher, resolve=True))
    max_len = int(getattr(teacher, "max_position_embeddings", 0) or 0)
    if max_len and int(cfg.data.seq_len) > max_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the teacher's maximum of {max_len} positions")
    method = method_class(OmegaConf.select(cfg, "method._target_"))
    method.check_settings(teacher, *(OmegaConf.to_container(cfg[k], resolve=True) for k in ("student", "loss")))


def check_static(cfg: DictConfig, resume_check: Any = None, command: str = "lrc-distill") -> tuple[Path, str | None]:
    """Checks of the output directory (held locked by :func:`run`): returns it and the checkpoint
    to resume from (``None`` for a fresh run). A directory holding a checkpoint, ``metrics.json``
    or an export holds a run and is refused for a fresh start; one holding only what a failed
    start left is reused, with those files set aside. A checkpoint to resume from is read once,
    safely, and must fit this run's teacher and student (``resume_check(cfg, ckpt)``, default
    :func:`check_resume`; lrc-sft passes its own, and its ``command`` name for the messages)."""
    out = Path(cfg.paths.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    ckpt = cfg.ckpt_path
    if ckpt == "auto":
        ckpt = str(last) if last.exists() else None  # a file, or a directory (trainer=fsdp: sharded)
    elif ckpt == "last":
        if not last.exists():
            raise ConfigError(
                f"ckpt_path=last but {last} does not exist: {out} holds no checkpoint to resume; "
                f"run again without ckpt_path=last to start afresh in that directory"
            )
        ckpt = str(last)
    elif ckpt is not None and not Path(ckpt).exists():
        raise ConfigError(f"ckpt_path {ckpt!r} does not exist")
    if not is_rank_zero():  # the other processes of a multi-GPU run follow rank 0, which checked
        return out, ckpt
    if ckpt is None:
        held = run_evidence(out)
        if held:
            raise ConfigError(
                f"output directory {out} already holds a run ({', '.join(held)}); resume it with ckpt_path=last "
                f"or choose another directory (hydra.run.dir=...)"
            )
        set_aside_failed_start(out, command)
    else:
        (resume_check or check_resume)(cfg, ckpt)
    return out, ckpt


def run_evidence(out: Path) -> list[str]:
    """What in ``out`` shows a run that got somewhere: checkpoints, a summary, an export."""
    found = sorted(str(p.relative_to(out)) for p in (out / "checkpoints").glob("*.ckpt"))
    return found + [name for name in ("metrics.json", "student") if (out / name).exists()]


def set_aside_failed_start(out: Path, command: str = "lrc-distill") -> None:
    """Move what a start that never reached a checkpoint left in ``out`` (see :data:`LEFTOVERS`)
    into ``out/failed-start-<time>/``, so the new run's logs do not mix with it (``command`` names
    the tool in the message)."""
    found = [name for name in LEFTOVERS if (out / name).exists()]
    if not found:
        return
    aside = out / time.strftime("failed-start-%Y-%m-%d_%H-%M-%S")
    aside.mkdir()
    for name in found:
        os.replace(out / name, aside / name)
    print(f"{command}: {out} holds no checkpoint, only what a failed start left ({', '.join(found)}); "
          f"moved to {aside.name}/ and starting afresh", file=sys.stderr)


def check_resume(cfg: DictConfig, ckpt: str) -> None:
    """The checkpoint must be readable and written for this teacher and student shape."""
    from lrc.training.checkpoint_io import load_checkpoint

    from lrc.training.module import DEFAULT_METHOD

    state = load_checkpoint(ckpt, mmap=True, optimizer=False)
    saved = OmegaConf.create((state.get("lrc") or {}).get("config") or {})
    if not saved:  # written before checkpoints carried the run config: the shape check on load decides
        return
    if "method" not in saved:  # written before the method was a choice: it was lrc
        saved.method = {"_target_": DEFAULT_METHOD}
    diffs = []
    for key in RESUME_KEYS:
        was, now = (_plain_select(c, key) for c in (saved, cfg))
        if was != now:
            diffs.append(f"{key}={was!r} there, {now!r} here")
    if diffs:
        raise ConfigError(
            f"cannot resume from {ckpt}: it was written with other settings ({'; '.join(diffs)}). A resume continues "
            f"the same student: drop those overrides, or start a new run in another directory (hydra.run.dir=...)"
        )


def _plain_select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def apply_batch_plan(cfg: DictConfig) -> None:
    """Set ``trainer.accumulate_grad_batches`` so that an optimizer step sees ``global_batch_size``
    sequences on however many devices this run has (``devices=-1`` / ``auto`` resolved here, before
    the Trainer exists), and refuse a run that plans more tokens than ``max_data_epochs`` passes over
    the unique tokens its data sources declare."""
    from lrc.training.plan import (
        accumulation_steps, check_token_budget, declared_unique_tokens, device_count, tokens_per_step,
    )

    t = cfg.trainer
    gbs = cfg.get("global_batch_size")
    unique = declared_unique_tokens(cfg.data.get("sources") or [])
    steps = t.get("max_steps")
    repeats_data = t.get("fast_dev_run") or t.get("overfit_batches")  # short or one-batch runs: no budget
    budgeted = unique is not None and bool(steps) and int(steps) > 0 and not repeats_data
    if gbs is None and not budgeted:
        return
    try:
        nodes = int(t.get("num_nodes") or 1)
        devices = device_count(t.get("accelerator", "auto"), t.get("devices", "auto"))
        accum = int(t.get("accumulate_grad_batches") or 1)
        if gbs is not None:
            derived = accumulation_steps(gbs, int(cfg.data.batch_size), devices, nodes)
            if accum not in (1, derived):
                raise ConfigError(
                    f"global_batch_size={gbs} implies trainer.accumulate_grad_batches={derived} on {devices * nodes} "
                    f"device(s), but it is set to {accum}; set only one of the two"
                )
            accum = t.accumulate_grad_batches = derived
        if budgeted:
            per_step = tokens_per_step(int(cfg.data.seq_len), int(cfg.data.batch_size), devices, nodes, accum)
            check_token_budget(int(steps) * per_step, unique, cfg.get("max_data_epochs", 1))
    except ValueError as err:
        raise ConfigError(str(err)) from None


# ---------------------------------------------------------------------------------- build
def build_trainer(cfg: DictConfig, callbacks: list, extra_loggers: tuple = ()) -> Any:
    """The Trainer with the config's loggers, then ``extra_loggers`` (lrc's own ``curves.csv``), and
    lrc's checkpoint reader/writer (crash-safe writes, ``weights_only`` reads) for every save and resume."""
    from lrc.training.checkpoint_io import AtomicCheckpointIO

    loggers = [instantiate_checked(c) for c in (cfg.get("logger") or [])] + list(extra_loggers)
    plugins = [instantiate_checked(c) for c in (cfg.trainer.get("plugins") or [])] + [AtomicCheckpointIO()]
    return instantiate_checked(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)


def checkpoint_note(out: Path) -> str:
    """What a stopped run left to resume from, for its error message."""
    from lrc.training.checkpoint_io import load_checkpoint

    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        return "no checkpoint was written"
    try:
        step = load_checkpoint(last, mmap=True, optimizer=False).get("global_step")
    except ValueError:
        return f"{last} is unreadable"
    return f"{last} (step {step}) is untouched and finite"


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
    """The whole job. Returns the summary dict (also written to ``metrics.json``).

    The settings are checked before anything is read or written; the output directory is then
    locked for the whole run, so a second run aimed at it fails at once."""
    try:
        check_settings(cfg)
        apply_batch_plan(cfg)  # trainer.accumulate_grad_batches from global_batch_size; token budget
        check_teacher_fit(cfg)  # the teacher's config only: before any conversion, download or write
    except ValueError as err:
        hint = baseline_on_demo_hint(cfg)
        if hint:
            raise ConfigError(f"{err}{hint}") from None
        raise
    with lock_run_dir(Path(cfg.paths.output_dir)):
        done = finished_summary(cfg)
        if done is not None:
            print(f"lrc-distill: {cfg.paths.output_dir} already finished {done['steps']} steps "
                  f"(ckpt_path=auto): skipped", file=sys.stderr)
            return done
        return _run(cfg)


def baseline_on_demo_hint(cfg: DictConfig) -> str:
    """The embedded default job (``experiment=demo``) sets LRC-only keys (``student.init``,
    ``loss.alpha``) that a baseline method refuses; when a baseline is composed with it, the text to
    add to that refusal (empty otherwise, and outside ``@hydra.main``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().runtime.choices.get("experiment") != "demo":
        return ""
    method = str(OmegaConf.select(cfg, "method.name", default="lrc"))
    if method == "lrc":
        return ""
    paper = f"experiment=paper/fig3_{method} or " if (CONF_DIR / "experiment" / "paper" / f"fig3_{method}.yaml").exists() else ""
    return (f" (the embedded default job, experiment=demo, is an LRC recipe: run method={method} with "
            f"{paper}without the demo, '~experiment')")


def finished_summary(cfg: DictConfig) -> dict[str, Any] | None:
    """With ``ckpt_path=auto``, the stored summary of a run in the output directory that already
    finished exactly this run's ``trainer.max_steps`` (a rerun of a sweep skips its finished jobs);
    ``None`` otherwise (a fresh start, an interrupted run to resume, or a longer run to extend)."""
    if cfg.ckpt_path != "auto":
        return None
    path = Path(cfg.paths.output_dir) / "metrics.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if summary.get("status") == "finished" and summary.get("steps") == int(cfg.trainer.max_steps):
        return summary
    return None


def _run(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L
    import torch

    from lrc.cli.fit import train
    from lrc.teachers import load_teacher

    out, ckpt = check_static(cfg)
    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own lines
    container = OmegaConf.to_container(cfg, resolve=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    # the datamodule validates its sources (files exist, fields present) before anything heavy
    datamodule = instantiate_checked(cfg.data)
    teacher_kw = container["teacher"]
    teacher, tokenizer = load_teacher(**teacher_kw)  # student and seq_len were checked by check_teacher_fit
    datamodule.set_tokenizer(tokenizer)
    datamodule.check_data()  # reads and packs the data now (cached): bad rows, too little data, no validation

    module = build_module(container, teacher, tokenizer)
    fit = train(cfg, module, datamodule, out, ckpt, container)
    trainer = fit.trainer
    summary: dict[str, Any] = {
        "status": "finished",
        **run_identity(cfg, module.method_name),
        **fit.throughput(module),
        "tokens_per_source": dict(module.tokens_per_source),
        "wall_time_total_s": fit.total_wall(),  # summed over resumes
        "params": parameter_counts(module),
    }
    if fit.stopped(summary, best=True):
        return summary

    summary.update(fit.validation(module, datamodule))
    if cfg.export.enabled:
        from lrc.training.distributed import export_student

        dtype = getattr(torch, cfg.export.dtype) if cfg.export.dtype else None
        path = export_student(module, trainer, out / "student", dtype=dtype)  # rank 0 writes; None elsewhere
    if not trainer.is_global_zero:  # the other processes of a multi-process run end here
        return summary
    if cfg.export.enabled:
        summary["export_dir"] = str(path.resolve())
        summary["answer"] = greedy_answer(path, cfg.summary.prompt, int(cfg.summary.max_new_tokens),
                                          int(cfg.summary.get("min_new_tokens") or 0))
        summary["prompt"] = cfg.summary.prompt
    _write_json(out / "metrics.json", summary)
    print_summary(summary)
    return summary


def greedy_answer(model_dir: Path, prompt: str, max_new_tokens: int, min_new_tokens: int = 0) -> str:
    """Load the exported student like any transformers model and answer ``prompt`` greedily, with
    at least ``min_new_tokens`` tokens before it may end its turn."""
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
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=min(min_new_tokens, max_new_tokens),
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def build_module(container: dict[str, Any], teacher: Any, tokenizer: Any) -> Any:
    """The method's LightningModule: the class ``method._target_`` names, built with the ``method``
    node's own options and the settings every method shares. Nothing here knows which method runs."""
    from lrc.training.module import method_class

    options = dict(container.get("method") or {})
    cls = method_class(options.pop("_target_", None))
    return cls(
        teacher=container["teacher"],
        student=container["student"],
        loss=container["loss"],
        optim=container["optim"],
        log=container["log"],
        document_mask=bool(container["document_mask"]),
        teacher_model=teacher,
        tokenizer=tokenizer,
        run_config=container,
        **options,
    )


def run_identity(cfg: DictConfig, method: str) -> dict[str, Any]:
    """``method`` (the module's ``method_name``: ``method.name``), ``seed`` and the job's
    command-line ``overrides`` (empty outside ``@hydra.main``, e.g. through the Python API),
    recorded in ``metrics.json`` for ``lrc-collect``."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # HydraConfig is not set: not running under @hydra.main
        pass
    return {"method": str(method), "seed": int(cfg.seed), "overrides": overrides}


def parameter_counts(module: Any) -> dict[str, int]:
    """Trainable parameters, and the parameters of the exported student (the method's
    ``deployed_parameter_count``: built on the meta device, a tied embedding and head counted once)."""
    return {
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "deployed": module.deployed_parameter_count(),
    }


def best_logged_validation(curves: Path) -> dict[str, Any] | None:
    """The validation with the lowest ``val/ce`` in ``curves.csv`` (values rounded like ``val``)."""
    from lrc.analysis.curves import best_validation, read_curves

    best = best_validation(read_curves(curves)) if curves.is_file() else None
    return None if best is None else {k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from lrc.io import atomic_write

    with atomic_write(path, "w") as fh:
        fh.write(json.dumps(data, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="distill")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One job. A bad input or a stopped run prints ``lrc-distill: error: ...`` and exits with 2. In
    a sweep (``-m``) any failing job instead writes ``error.txt`` into its directory and the sweep
    goes on; the sweep's summary (:mod:`lrc.cli.hydra_hooks`) lists it and the exit status is 1. A
    job stopped by SIGINT / SIGTERM stops the whole sweep (exit status 130) after its checkpoint."""
    try:
        summary = run(cfg)
    except Exception as err:  # noqa: BLE001 - reported below, re-raised when unexpected outside a sweep
        if os.environ.get("LRC_DEBUG"):
            raise
        expected = isinstance(err, USER_ERRORS)
        if _in_sweep():
            from hydra.core.hydra_config import HydraConfig

            from lrc.cli.hydra_hooks import write_job_error

            job_dir = Path(HydraConfig.get().runtime.output_dir)
            details = "" if expected else traceback.format_exc()
            written = write_job_error(job_dir, list(HydraConfig.get().overrides.task), err, details)
            print(f"lrc-distill: error: job {HydraConfig.get().job.num} failed: {err}"
                  + (f" (see {written})" if written else ""), file=sys.stderr)
            return None
        if not expected:
            raise
        print(f"lrc-distill: error: {err}", file=sys.stderr)
        sys.exit(2)
    if summary.get("interrupted") and _in_sweep():
        # SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption) stops the whole sweep, not only this job
        from hydra.core.hydra_config import HydraConfig

        print(f"lrc-distill: sweep stopped: job {HydraConfig.get().job.num} was interrupted (its checkpoint is "
              f"written); rerun the same command with ckpt_path=auto to resume it and skip the finished jobs",
              file=sys.stderr)
        sys.exit(130)
    return (summary.get("val") or {}).get("ce")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
