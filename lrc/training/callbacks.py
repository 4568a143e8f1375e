"""Callbacks: save-and-stop on SIGINT/SIGTERM, progress in optimizer steps (a Rich bar on a
terminal, plain lines in a log file)."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class GracefulShutdown(L.Callback):
    """On SIGINT or SIGTERM, finish the current step, write ``<dirpath>/last.ckpt`` and stop.
    Also writes it after the final step, so a finished run always ends with a checkpoint.

    The checkpoint holds the optimizer, scheduler, data position and trainable weights, so
    ``ckpt_path=last`` continues exactly where the run stopped.  It is written from
    ``on_train_batch_end``, the same point as Lightning's own periodic checkpoints, which is
    what Lightning's resume logic expects.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C stops at once
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if self.received is None and not (final and not trainer.fast_dev_run):
            return
        trainer.save_checkpoint(self.path)
        if self.received is not None:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)  # a failed run gives the signals back too

    @property
    def interrupted(self) -> bool:
        return self.received is not None


class LastValidation(L.Callback):
    """The ``val/*`` metrics of a fit's most recent validation and the optimizer step it ran after
    (sanity checks and validations outside ``trainer.fit`` are not counted), so the run's final
    summary need not validate the same weights again (:meth:`lrc.cli.fit.Fit.validation`)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.metrics: dict[str, float] | None = None

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.step = int(trainer.global_step)
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


class StepProgressBar(RichProgressBar):
    """Progress in optimizer steps, on a terminal and in a log file alike.

    On a terminal (or in Jupyter) it is Lightning's Rich bar, counting optimizer steps of the
    whole run (``step 120/500``, resumes included) instead of Lightning's "Epoch 0/-2". Anywhere
    else (output redirected to a file, CI, SLURM) Rich would print nothing until the end, so the
    bar is off and one plain line goes to stdout every ``print_every_n_steps`` optimizer steps and
    at the last one::

        step 40/200 (20%) | loss 3.2141 | 1,234 tokens/s | elapsed 0:01:02 | ETA 0:04:08

    plus one line per validation during training. ``print_every_n_steps=0`` prints no such lines;
    ``plain`` forces one mode (``None``: decide from stdout).
    """

    def __init__(self, print_every_n_steps: int = 10, plain: bool | None = None, refresh_rate: int = 1,
                 leave: bool = False, console_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs)
        if isinstance(print_every_n_steps, bool) or not isinstance(print_every_n_steps, int) or print_every_n_steps < 0:
            raise ValueError(f"callbacks.progress.print_every_n_steps must be an integer >= 0, got {print_every_n_steps!r}")
        self.print_every_n_steps = print_every_n_steps
        self.plain = _plain_output() if plain is None else plain
        self._t0: float | None = None
        self._start: tuple[int, int] = (0, 0)  # (step, tokens) when this process started training
        self._printed = -1
        self._total: int | float | None = None

    # ------------------------------------------------------------------------- Rich bar
    @property
    def is_enabled(self) -> bool:
        return not self.plain and super().is_enabled

    def _total_steps(self) -> int | float:
        if self._total is None:  # Lightning computes it from the data loaders: once is enough
            total = self.trainer.estimated_stepping_batches
            self._total = float("inf") if total is None or total < 0 or total == float("inf") else int(total)
        return self._total

    def _get_train_description(self, current_epoch: int) -> str:
        return "step"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:  # one bar for the whole run, not one per epoch
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)

    def _initialize_train_progress_bar_id(self) -> None:
        self.train_progress_bar_id = self._add_task(self._total_steps(), self._get_train_description(0))
        self._update(self.train_progress_bar_id, self.trainer.global_step)

    # ---------------------------------------------------------------------- both modes
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total = None
        super().on_train_start(trainer, pl_module)
        self._t0 = time.perf_counter()
        self._start = (trainer.global_step, int(getattr(pl_module, "tokens_seen", 0)))
        self._printed = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.is_disabled:
            if self.train_progress_bar_id is None:
                self._initialize_train_progress_bar_id()
            self._update(self.train_progress_bar_id, trainer.global_step)
            self._update_metrics(trainer, pl_module)
            self.refresh()
        step = trainer.global_step
        every = self.print_every_n_steps
        due = every and step != self._printed and (step % every == 0 or step >= self._total_steps())
        if self.plain and due and trainer.is_global_zero:
            self._printed = step
            print(self.status_line(trainer, pl_module), flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.plain and self.print_every_n_steps and trainer.state.fn == "fit" and trainer.is_global_zero:
            values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
            print(f"validation at step {trainer.global_step}: {shown}", flush=True)

    def status_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """``step s/N (p%) | loss | tokens/s | elapsed | ETA``, over this process's part of the run."""
        step, total = trainer.global_step, self._total_steps()
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        done_here = step - self._start[0]
        parts = [f"step {step}/{total:.0f}" + (f" ({100 * step / total:.0f}%)" if math.isfinite(total) else "")]
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        tokens = int(getattr(pl_module, "tokens_seen", 0)) - self._start[1]
        if elapsed > 0 and tokens > 0:
            parts.append(f"{tokens / elapsed:,.0f} tokens/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if done_here > 0 and math.isfinite(total):
            parts.append(f"ETA {_clock(elapsed / done_here * max(total - step, 0))}")
        return " | ".join(parts)


def _plain_output() -> bool:
    """True when stdout is neither a terminal nor a notebook (a log file, a pipe)."""
    from rich.console import Console

    console = Console()
    return not (console.is_terminal or console.is_jupyter)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


#: Dense bf16 peak TFLOP/s per device, by a substring of ``torch.cuda.get_device_name()`` (the
#: vendors' data-sheet figures without sparsity; SXM parts). First match wins.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))


def peak_tflops_for(device_name: str | None) -> float | None:
    """The bf16 peak of :data:`PEAK_BF16_TFLOPS` for a device name, ``None`` when unknown."""
    for key, peak in PEAK_BF16_TFLOPS:
        if device_name and key.lower() in device_name.lower():
            return peak
    return None


class ThroughputMonitor(L.Callback):
    """Logs, every ``every_n_steps`` optimizer steps, the training throughput since the last log:
    ``perf/tokens_per_s_per_device``, ``perf/tflops_per_device`` (tokens/s per device x the FLOPs per
    token :mod:`lrc.estimate` counts for the run's config) and ``perf/mfu`` (that over the device's
    peak). ``peak_tflops``: the peak per device; ``None`` looks it up by CUDA device name
    (:data:`PEAK_BF16_TFLOPS`) and leaves MFU out when it is unknown (a CPU). ``flops_per_token``:
    ``None`` counts it from the module's run config (LRC only; other methods log tokens/s alone).
    ``clock``: seconds, for tests.
    """

    def __init__(self, peak_tflops: float | None = None, flops_per_token: float | None = None,
                 every_n_steps: int = 10, clock: Any = time.perf_counter) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"callbacks.throughput.every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if peak_tflops is not None and not float(peak_tflops) > 0:
            raise ValueError(f"callbacks.throughput.peak_tflops must be > 0 or null, got {peak_tflops!r}")
        self.peak_tflops = None if peak_tflops is None else float(peak_tflops)
        self.flops_per_token = flops_per_token
        self.every_n_steps = every_n_steps
        self.clock = clock
        self._last: tuple[float, int] | None = None
        self._step: int | None = None  # the optimizer step last measured (one per step, not per micro-batch)

    def measure(self, tokens_seen: int, now: float, devices: int) -> dict[str, float]:
        """Throughput since the previous call (empty on the first): tokens/s per device and, when
        the FLOPs per token (and the peak) are known, TFLOP/s per device (and MFU)."""
        last, self._last = self._last, (now, int(tokens_seen))
        if last is None or now <= last[0]:
            return {}
        per_device = (tokens_seen - last[1]) / (now - last[0]) / max(int(devices), 1)
        out = {"perf/tokens_per_s_per_device": per_device}
        if self.flops_per_token:
            tflops = per_device * self.flops_per_token / 1e12
            out["perf/tflops_per_device"] = tflops
            if self.peak_tflops:
                out["perf/mfu"] = tflops / self.peak_tflops
        return out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_tflops is None and pl_module.device.type == "cuda":
            import torch

            self.peak_tflops = peak_tflops_for(torch.cuda.get_device_name(pl_module.device))
        if self.flops_per_token is None:
            self.flops_per_token = run_flops_per_token(getattr(pl_module, "run_config", None))
        self._last = None
        self.measure(int(getattr(pl_module, "tokens_seen", 0)), self.clock(), trainer.world_size)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps or trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        values = self.measure(int(getattr(pl_module, "tokens_seen", 0)), self.clock(), trainer.world_size)
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False)


def run_flops_per_token(run_config: dict | None) -> float | None:
    """Training FLOPs per token (:func:`lrc.estimate.flops_per_token`, ``total``) of an lrc-distill
    run config; ``None`` when there is none or it is not an LRC run."""
    if not run_config:
        return None
    from omegaconf import OmegaConf

    from lrc.cli.common import ConfigError
    from lrc.cli.estimate import estimate

    try:
        return float(estimate(OmegaConf.create(run_config))["flops_per_token"]["total"])
    except (ConfigError, KeyError, TypeError, ValueError):
        return None
