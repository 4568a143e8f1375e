"""Multiple-choice accuracy of the student *during* training: :class:`PeriodicEval`.

Every ``every_n_steps`` optimizer steps (``callbacks.eval`` in ``conf/callbacks/default.yaml``; 0 =
off, the default) the callback scores a few small multiple-choice tasks with the student as it is at
that step, and logs ``eval/<task>/acc`` and ``eval/<task>/acc_norm`` at that step to every logger of
the run, ``curves.csv`` included (so ``lrc-collect`` and the notebooks can plot them like ``val/ce``).

Tasks are those ``lrc-eval`` scores offline: the embedded ``pydoc_mc`` (:mod:`lrc.eval.pydoc_mc`) and
local multiple-choice files (:func:`lrc.eval.mc.read_mc_file`; the task is the file's stem). The
scoring is :func:`lrc.eval.mc.score_items`, lm-eval's log-likelihood rule, run on
:class:`StudentLM`, a thin adapter that makes a method's student look like a transformers causal
LM. The tokenizer is the teacher's, which the student shares.

Which student: a :class:`~lrc.training.module.DistillModule` (``lrc``, ``kd``, ``tinybert``): its
model's forward with the method's validation options, read at ``student_logits`` (the clone and the
baselines' models also run the frozen teacher in that forward, so an evaluation costs about what a
validation batch of the same tokens costs). A module with a plain causal LM at ``lm`` (lrc-sft's) is
scored directly. Any other LightningModule is refused when training starts.

Processes: every process scores the same items and rank 0 logs. Under ``trainer=ddp`` the other
processes would wait for rank 0 at the next gradient all-reduce anyway; under ``trainer=fsdp`` the
student is sharded and each layer's forward gathers its shards from every process, exactly as in a
validation step, so every process must run the same forwards; afterwards the gathered parameters
are freed again (:func:`reshard`), since no backward follows to free them before a checkpoint
(which needs the sharded parameters) is written. The same numbers come out either way.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import lightning as L
import torch

from lrc.eval.mc import MCItem, read_mc_file, score_items, summarize
from lrc.eval.pydoc_mc import TASK_NAME as PYDOC_TASK
from lrc.eval.pydoc_mc import build_pydoc_items

__all__ = ["PeriodicEval", "StudentLM", "check_eval_callbacks", "load_tasks", "student_lm"]

#: file suffixes a task entry may end in to be read as a local multiple-choice file
MC_SUFFIXES = (".jsonl", ".json")
#: ``pydoc_mc`` is drawn with this seed (lrc-eval's default ``seed``)
PYDOC_SEED = 0


def _count(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


@functools.lru_cache(maxsize=8)
def _pydoc_items(max_items: int) -> tuple[MCItem, ...]:
    return tuple(build_pydoc_items(max_items, PYDOC_SEED))


def load_tasks(tasks: Sequence[str], max_items: int) -> dict[str, list[MCItem]]:
    """``{task name: its first max_items items}`` for ``tasks`` entries: ``pydoc_mc`` (the embedded
    task, a seeded sample of ``max_items``) or the path of a local ``.jsonl`` / ``.json`` multiple-choice
    file (named by its stem). ``ValueError`` for an unknown name, a bad row or two tasks of one name;
    ``FileNotFoundError`` for a missing file."""
    out: dict[str, list[MCItem]] = {}
    for entry in tasks:
        entry = str(entry)
        if entry == PYDOC_TASK:
            name, items = PYDOC_TASK, list(_pydoc_items(max_items))
        elif entry.endswith(MC_SUFFIXES):
            try:
                name, items = Path(entry).stem, read_mc_file(entry)[:max_items]
            except (ValueError, FileNotFoundError) as err:
                raise type(err)(f"tasks: {err}") from None
        else:
            raise ValueError(
                f"tasks: unknown task {entry!r}; a task is {PYDOC_TASK!r} (the embedded task) or the "
                f"path of a local multiple-choice file ending in {' or '.join(MC_SUFFIXES)}"
            )
        if name in out:
            raise ValueError(f"tasks: two tasks are named {name!r} (a file's task is its stem)")
        out[name] = items
    return out


class StudentLM:
    """A :class:`~lrc.training.module.DistillModule`'s student as :func:`~lrc.eval.mc.score_items`
    calls a transformers causal LM: ``lm(input_ids=, attention_mask=).logits`` are the student
    logits of the method's model (``module.model``) run with its validation ``forward_options``;
    ``parameters()`` and ``config`` (the teacher's: its context length) are the model's."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.model = module.model
        teacher = getattr(self.model, "teacher", None)
        self.config = getattr(self.model, "teacher_config", None) or getattr(teacher, "config", None)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        out = self.model(input_ids, attention_mask, **self.module.forward_options(False))
        return SimpleNamespace(logits=out.student_logits)


def student_lm(module: Any) -> tuple[Any, Any, torch.nn.Module]:
    """``(causal LM for score_items, tokenizer, the module to put in eval mode)`` for a training
    module; ``ValueError`` for a module with no student forward."""
    model = getattr(module, "model", None)
    if model is not None and callable(getattr(module, "forward_options", None)):
        return StudentLM(module), getattr(model, "tokenizer", None), model
    lm = getattr(module, "lm", None)
    if isinstance(lm, torch.nn.Module):  # lrc-sft: a plain causal LM
        return lm, getattr(module, "tokenizer", None), lm
    raise ValueError(
        f"PeriodicEval: {type(module).__name__} exposes no student forward (a DistillModule's model with "
        f"forward_options, or a causal LM at .lm); turn the callback off (callbacks.eval.every_n_steps=0)"
    )


def reshard(net: torch.nn.Module) -> None:
    """Free the parameters FSDP2 gathered for a forward without gradients and left gathered (the
    root unit's, and those of units built with ``reshard_after_forward=False``: a backward would free
    them), so the registered parameters are again the shards the optimizer and checkpoints hold.
    Nothing happens to a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in net.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class PeriodicEval(L.Callback):
    """Score small multiple-choice tasks with the student every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: optimizer steps between two evaluations (at steps N, 2N, ...); 0 = off.
        tasks: ``pydoc_mc`` and/or paths of local multiple-choice files (see :func:`load_tasks`).
        max_items: at most this many items per task.
        batch_size: sequences per forward.
        at_start: also evaluate before the first optimizer step of a fresh run (step 0).

    Settings and task files are checked here (``ValueError`` / ``FileNotFoundError``), so a
    ``lrc-distill`` run refuses them before any work (:func:`check_eval_callbacks`). After each
    evaluation :attr:`history` holds ``(step, metrics)`` and :attr:`last_scored` the per-item scores
    of :func:`~lrc.eval.mc.score_items` by task.
    """

    def __init__(self, every_n_steps: int = 0, tasks: Sequence[str] = (PYDOC_TASK,), max_items: int = 32,
                 batch_size: int = 8, at_start: bool = False) -> None:
        self.every_n_steps = _count("every_n_steps", every_n_steps, 0)
        self.max_items = _count("max_items", max_items, 1)
        self.batch_size = _count("batch_size", batch_size, 1)
        if not isinstance(at_start, bool):
            raise ValueError(f"at_start must be true or false, got {at_start!r}")
        self.at_start = at_start
        if isinstance(tasks, str):
            tasks = [tasks]
        self.tasks: dict[str, list[MCItem]] = {}
        if self.enabled:
            self.tasks = load_tasks(list(tasks), self.max_items)
            if not self.tasks:
                raise ValueError("tasks is empty: name at least one task, or set every_n_steps=0")
        self.history: list[tuple[int, dict[str, float]]] = []
        self.last_scored: dict[str, list[dict[str, Any]]] = {}
        self._step: int | None = None  # the optimizer step last evaluated (one per step, not per micro-batch)

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            student_lm(pl_module)  # the model is built by now: refuse a module without a student forward

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.at_start and trainer.global_step == 0:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.enabled or step == 0 or step % self.every_n_steps or step == self._step:
            return
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Score every task now, on every process; rank 0 logs ``eval/<task>/acc`` and ``acc_norm``
        at ``trainer.global_step`` to each of the trainer's loggers."""
        step = self._step = trainer.global_step
        lm, tokenizer, net = student_lm(pl_module)
        if tokenizer is None:
            raise ValueError(f"PeriodicEval: {type(pl_module).__name__} holds no tokenizer to score with")
        was_training = net.training
        net.eval()
        try:
            with trainer.precision_plugin.forward_context():
                scored = {name: score_items(lm, tokenizer, items, batch_size=self.batch_size)
                          for name, items in self.tasks.items()}
        finally:
            net.train(was_training)
            reshard(net)
        metrics: dict[str, float] = {}
        for name, rows in scored.items():
            summary = summarize(rows)
            metrics[f"eval/{name}/acc"] = float(summary["acc"])
            metrics[f"eval/{name}/acc_norm"] = float(summary["acc_norm"])
        self.last_scored = scored
        self.history.append((step, metrics))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        return metrics


def check_eval_callbacks(cfg: Any) -> None:
    """Build every :class:`PeriodicEval` of ``cfg.callbacks`` once, so its settings, task names and
    files are refused (``ConfigError`` naming the callback) before any teacher loads or file is written."""
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate

    from lrc.cli.common import ConfigError

    for key, node in (cfg.get("callbacks") or {}).items():
        target = node.get("_target_") if hasattr(node, "get") else None  # check_config refused other values
        try:
            cls = get_class(str(target)) if target else None
        except Exception:  # noqa: BLE001 - a bad _target_ is reported when the callbacks are built
            continue
        if not (isinstance(cls, type) and issubclass(cls, PeriodicEval)):
            continue
        try:
            instantiate(node)
        except InstantiationException as err:
            cause = err.__cause__
            if isinstance(cause, (ValueError, FileNotFoundError)):
                raise ConfigError(f"callbacks.{key}.{cause}") from None
            raise
