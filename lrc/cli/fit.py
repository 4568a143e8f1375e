"""The training run ``lrc-distill`` and ``lrc-sft`` share, once their module and data are built.

:func:`train` builds the Trainer (the config's callbacks and loggers, plus lrc's ``curves.csv``),
writes the run's ``config.yaml`` (a fresh start only: every check has passed by then), validates
before training when asked, and times the fit. The :class:`Fit` it returns gives the summary's
shared parts: throughput, the interrupted ending, the final validation.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrc.cli.common import ConfigError, is_rank_zero


@dataclass
class Fit:
    """A finished (or interrupted) ``trainer.fit``: what the run's summary is made of."""

    trainer: Any
    curves: Any  # the run's CurvesLogger (curves.csv)
    shutdown: Any  # the GracefulShutdown callback, None when the config has none
    out: Path
    before: dict[str, float]  # validation before training ({} when not run)
    wall: float  # seconds of this process's fit
    tokens_at_start: int  # module.tokens_seen when the fit began (a resume's count)
    last: Any  # the LastValidation callback: the fit's most recent validation

    def throughput(self, module: Any) -> dict[str, Any]:
        """``run_dir``, ``tokens_seen``, ``steps``, ``wall_time_s`` and ``tokens_per_s`` (this process's fit)."""
        return {
            "run_dir": str(self.out.resolve()),
            "tokens_seen": int(module.tokens_seen),
            "steps": int(self.trainer.global_step),
            "wall_time_s": round(self.wall, 1),
            "tokens_per_s": round((module.tokens_seen - self.tokens_at_start) / max(self.wall, 1e-9), 1),
        }

    def total_wall(self) -> float:
        """Training wall time summed over resumes (from ``curves.csv``)."""
        return round(self.curves.elapsed(), 1)

    def stopped(self, summary: dict[str, Any], best: bool = False) -> bool:
        """True when a signal stopped the run: ``summary`` is then marked interrupted (with
        ``val_best`` when ``best``), and rank 0 prints how to resume and writes ``metrics.json``."""
        if self.shutdown is None or not self.shutdown.interrupted:
            return False
        from lrc.cli.distill import _write_json, best_logged_validation

        summary["status"] = "interrupted"
        if best:
            summary["val_best"] = best_logged_validation(self.curves.path)
        summary["interrupted"] = True
        summary["checkpoint"] = str(self.shutdown.path)
        if self.trainer.is_global_zero:  # one writer in a multi-process run
            print(f"interrupted: checkpoint written to {self.shutdown.path}; resume with ckpt_path=last "
                  f"hydra.run.dir={self.out}", file=sys.stderr)
            _write_json(self.out / "metrics.json", summary)
        return True

    def validation(self, module: Any, datamodule: Any) -> dict[str, Any]:
        """A final validation: ``val_before``, ``val`` and ``val_best`` (over every validation,
        resumes included), values rounded to 4 digits. When the fit's own last validation ran
        after its last step, ``val`` is that one's metrics (the same weights and batches); otherwise
        the validation set runs once more."""
        from lrc.cli.distill import best_logged_validation

        final = self.last.metrics if self.last.step == self.trainer.global_step else None
        if final is None:
            final = self.trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        return {
            "val_before": {k.removeprefix("val/"): round(v, 4) for k, v in self.before.items() if k.startswith("val/")},
            "val": {k.removeprefix("val/"): round(float(v), 4) for k, v in final.items() if k.startswith("val/")},
            "val_best": best_logged_validation(self.curves.path),
        }


def train(cfg: DictConfig, module: Any, datamodule: Any, out: Path, ckpt: str | None,
          container: dict[str, Any]) -> Fit:
    """Build the Trainer, write ``config.yaml`` (fresh start, rank 0), validate before training
    (``validate_before``, fresh start) and fit from ``ckpt``. A non-finite loss is reported as a
    :class:`ConfigError` naming the checkpoint left to resume from."""
    from lrc.cli.distill import build_trainer, checkpoint_note, instantiate_checked
    from lrc.io import atomic_write
    from lrc.training.callbacks import GracefulShutdown, LastValidation
    from lrc.training.curves import CURVES_FILE, CurvesLogger
    from lrc.training.module import NonFiniteError

    callbacks = [instantiate_checked(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    curves = CurvesLogger(out / CURVES_FILE, tokens=lambda: module.tokens_seen)  # whatever the logger group
    last = LastValidation()
    trainer = build_trainer(cfg, [*callbacks, last], extra_loggers=(curves,))
    shutdown = next((c for c in callbacks if isinstance(c, GracefulShutdown)), None)
    if ckpt is None and is_rank_zero():  # only now: every check above passed
        with atomic_write(out / "config.yaml", "w") as fh:
            fh.write(OmegaConf.to_yaml(container))

    before: dict[str, float] = {}
    if cfg.validate_before and ckpt is None:
        before = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
    start = time.perf_counter()
    curves.start()
    tokens_at_start = module.tokens_seen
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except NonFiniteError as err:
        raise ConfigError(f"training stopped: {err}; {checkpoint_note(out)}") from None
    return Fit(trainer, curves, shutdown, out, before, time.perf_counter() - start, tokens_at_start, last)
