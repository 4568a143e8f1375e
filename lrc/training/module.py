"""``DistillModule``: the Lightning glue around :class:`LowRankClone` and :class:`LRCLoss`."""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

import lightning as L
import torch
from torchmetrics import MeanMetric

from lrc.losses import LossConfig, LRCLoss, TermRequest, next_token_cross_entropy
from lrc.model import CloneConfig, LowRankClone
from lrc.model.init import init_calibrator
from lrc.training.schedules import schedule_fn

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf; nothing from the offending step was saved."""


class NonFiniteLossError(NonFiniteError):
    """Raised when the loss becomes NaN/Inf; names the step and the offending terms."""


class NonFiniteWeightsError(NonFiniteError):
    """Raised when an optimizer update leaves a trainable tensor NaN/Inf, or when a checkpoint
    about to be written holds one; names the step and the tensors."""


def non_finite(named: Any) -> list[str]:
    """Names of the tensors in ``named`` (``(name, tensor)`` pairs) holding a NaN or an Inf, with
    one host sync for all of them."""
    named = [(n, t) for n, t in named if torch.is_tensor(t) and t.is_floating_point()]
    if not named:
        return []
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu()
    return [n for (n, _), ok in zip(named, flags.tolist()) if not ok]


def _plain(d: Mapping[str, Any] | None) -> dict[str, Any]:
    if d is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(d, DictConfig):
            return OmegaConf.to_container(d, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(d)


class DistillModule(L.LightningModule):
    """Distil a teacher into a low-rank clone.

    Args:
        teacher: keyword arguments of :func:`lrc.teachers.load_teacher` (``source``, ``dtype``...).
        student: keyword arguments of :class:`CloneConfig` (``rank``, sharing, layers, init...).
        loss: keyword arguments of :class:`LossConfig`.
        optim: ``name`` (adam|adamw), ``lr``, ``betas``, ``eps``, ``weight_decay`` (projections
            only; RMSNorm gains are never decayed), ``schedule`` (linear|cosine|wsd|constant),
            ``warmup_ratio``, ``min_lr_ratio``, ``decay_ratio``; missing keys take
            :data:`OPTIM_DEFAULTS` (the paper's recipe, repeated by ``conf/optim/adam.yaml``).
        log: ``per_layer_every_n_steps`` (0 = never); missing keys take :data:`LOG_DEFAULTS`.
        document_mask: use the batch's ``segment_ids`` to stop attention across documents.
        teacher_model, tokenizer: an already loaded teacher (not saved in hyper-parameters);
            when absent, ``configure_model`` loads it from ``teacher``.
        run_config: the full resolved run config (lrc-distill's), saved in every checkpoint.
    """

    def __init__(
        self,
        teacher: Mapping[str, Any],
        student: Mapping[str, Any],
        loss: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        log: Mapping[str, Any] | None = None,
        document_mask: bool = False,
        teacher_model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher_model", "tokenizer", "run_config"])
        self.run_config = _plain(run_config)  # the whole resolved config, stored in checkpoints
        self.teacher_cfg = _plain(teacher)
        self.student_cfg = _plain(student)
        self.loss_fn = LRCLoss(LossConfig(**_plain(loss)))
        self.optim_cfg = optim_settings(optim)
        self.log_cfg = {**LOG_DEFAULTS, **_plain(log)}
        self.document_mask = document_mask
        # kept out of nn.Module registration: the clone shares (not copies) these weights
        self._loaded = (teacher_model, tokenizer)
        self.clone: LowRankClone | None = None
        self.tokens_seen = 0
        self.tokens_per_source: dict[str, int] = {}  # training tokens seen, by data source
        self._t_last: float | None = None
        self.val_metrics = torch.nn.ModuleDict(
            {k: MeanMetric() for k in ("ce", "teacher_ce", "kl", "top1_agreement")}
        )

    # ------------------------------------------------------------------------------ model
    def configure_model(self, restoring: bool = False) -> None:
        """Build the clone (Lightning calls this before fitting). ``restoring=True`` (lrc-export):
        its trainable tensors come from a checkpoint next, so the init, and a data-aware init's
        calibration, are skipped."""
        if self.clone is not None:
            return
        model, tok = self._loaded
        if model is None:
            from lrc.teachers import load_teacher

            model, tok = load_teacher(**self.teacher_cfg)
        config = CloneConfig(**self.student_cfg)
        ids = None if restoring else self._calibration_ids(config)
        self.clone = LowRankClone.from_teacher(model, config, tokenizer=tok, calibration_ids=ids, restoring=restoring)
        self.loss_fn.check_layers(self.clone.student_layers)
        self.clone.train(self.training)  # the teacher came in eval mode; nothing here uses dropout
        self._loaded = (None, tok)

    def _calibration_ids(self, config: CloneConfig) -> torch.Tensor | None:
        """The data-aware init's calibration batch (``init: pca``): the datamodule's first
        ``init_calibration_sequences`` training sequences (the same on every process and on a
        resume, whose checkpoint then overwrites the init); ``None`` for inits without data."""
        if init_calibrator(config.init) is None:
            return None
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not hasattr(datamodule, "calibration_batch"):
            raise ValueError(
                f"student.init={config.init!r} needs calibration data: fit with a datamodule that has "
                "calibration_batch(n) (TokenMixDataModule)"
            )
        return datamodule.calibration_batch(config.init_calibration_sequences)

    def trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold only what is trained: never the teacher's weights. A checkpoint whose
        trainable tensors are not all finite is refused here, before anything is written."""
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        bad = non_finite(checkpoint["state_dict"].items())
        if bad:
            raise NonFiniteWeightsError(
                f"non-finite trainable tensors at step {checkpoint.get('global_step', self.global_step)} "
                f"({len(bad)} of {len(keep)}: {bad[:5]}); no checkpoint written"
            )
        checkpoint["lrc"] = {
            "tokens_seen": self.tokens_seen,
            "tokens_per_source": dict(self.tokens_per_source),
            "trainable_keys": sorted(keep),
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a checkpoint that does not fit this student (other rank, sharing or layers) or
        holds non-finite tensors, naming the tensors, before any weight is touched."""
        own = {k: v for k, v in self.state_dict().items() if k in self.trainable_keys()}
        saved = checkpoint["state_dict"]
        problems = [f"{k}: checkpoint {tuple(saved[k].shape)}, this student {tuple(v.shape)}"
                    for k, v in own.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
        problems += [f"missing {k}" for k in sorted(set(own) - set(saved))]
        problems += [f"unexpected {k}" for k in sorted(set(saved) - set(own))]
        if problems:
            raise ValueError(
                f"the checkpoint does not fit this student ({len(problems)} tensor(s): {'; '.join(problems[:3])}); "
                f"use the student settings it was written with"
            )
        bad = non_finite(saved.items())
        if bad:
            raise ValueError(f"the checkpoint holds non-finite tensors {bad[:5]}")
        # teacher weights come from the teacher, not from the checkpoint
        checkpoint["state_dict"] = {**{k: v for k, v in self.state_dict().items()}, **checkpoint["state_dict"]}
        self.tokens_seen = checkpoint.get("lrc", {}).get("tokens_seen", 0)
        self.tokens_per_source = dict(checkpoint.get("lrc", {}).get("tokens_per_source", {}))

    # --------------------------------------------------------------------------- training
    def _forward(self, batch: Mapping[str, torch.Tensor], terms: TermRequest):
        seg = batch.get("segment_ids") if self.document_mask else None
        return self.clone(batch["input_ids"], batch.get("attention_mask"), segment_ids=seg, terms=terms)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        out = self._forward(batch, self.loss_fn.request)
        terms = self.loss_fn(out, ids, labels=batch.get("labels"))
        loss = terms["loss"]
        if not torch.isfinite(loss):
            bad = {k: v.item() for k, v in terms.items() if not torch.isfinite(v)}
            worst = [k for k in bad if k.count("/") == 2] or list(bad)
            raise NonFiniteLossError(
                f"non-finite loss at step {self.global_step}: offending terms {worst[:8]} "
                f"(values {[bad[k] for k in worst[:8]]}); nothing from this step was saved"
            )
        n_tokens = self._count_tokens(batch, ids.numel() if out.token_mask is None else out.token_mask.sum())
        now = time.perf_counter()
        tps = n_tokens / (now - self._t_last) if self._t_last is not None else float("nan")
        self._t_last = now
        summary = {f"train/{k}": v.detach() for k, v in terms.items() if k.count("/") <= 1}
        self.log_dict(summary, prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", terms["loss"].detach(), prog_bar=True, logger=False)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True)
        if math.isfinite(tps):
            self.log("train/tokens_per_s", tps, on_step=True)
            self.log("tok/s", tps, prog_bar=True, logger=False)
        every = int(self.log_cfg.get("per_layer_every_n_steps") or 0)
        if every and self.global_step % every == 0 and self.loggers:
            # straight to the loggers: self.log would repeat the last value on every later step
            per_layer = {f"train_layers/{k}": v.item() for k, v in terms.items() if k.count("/") == 2}
            for logger in self.loggers:
                logger.log_metrics(per_layer, step=self.global_step)
        return loss

    def _count_tokens(self, batch: Mapping[str, torch.Tensor], n_tokens: int | torch.Tensor) -> int:
        """Add this step's tokens, summed over all processes, to ``tokens_seen`` and, by source
        (``batch["source_ids"]`` indexes the data module's ``source_names``), to
        ``tokens_per_source`` (logged as ``train/tokens/<source>``). Returns the step's global count."""
        src = batch.get("source_ids")
        names = getattr(getattr(self.trainer, "datamodule", None), "source_names", None) if self._trainer else None
        counts = torch.as_tensor(n_tokens, dtype=torch.long).reshape(1).cpu()
        if src is not None and names:
            per_source = torch.bincount(src.flatten().cpu(), minlength=len(names)) * batch["input_ids"].shape[1]
            counts = torch.cat([counts, per_source])
        if self._trainer is not None:  # one all-reduce for the total and every source (identity on 1 process)
            counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
        total, *per_source = counts.tolist()
        self.tokens_seen += int(total)
        for name, c in zip(names or [], per_source):
            self.tokens_per_source[name] = self.tokens_per_source.get(name, 0) + int(c)
            self.log(f"train/tokens/{name}", float(self.tokens_per_source[name]), on_step=True)
        return int(total)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then a check that every trainable tensor is still finite. It runs
        before ``on_train_batch_end``, where checkpoints are written, so an update that produces a
        NaN or an Inf stops the run before it can be saved or exported."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        bad = non_finite((n, p) for n, p in self.named_parameters() if p.requires_grad)
        if bad:
            raise NonFiniteWeightsError(
                f"non-finite trainable tensors after the optimizer update of step {self.global_step} "
                f"({len(bad)} of {len(self.trainable_keys())}: {bad[:5]}); nothing from this step was saved"
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this hook after backward (and after unscaling fp16 gradients) but before it
        # clips them (Precision._after_closure), so this is the norm the clipping acts on
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm_preclip", norm, on_step=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True)

    # ------------------------------------------------------------------------- validation
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        out = self._forward(batch, TermRequest(terms=()))
        mask = out.token_mask
        labels = ids if mask is None else ids.masked_fill(~mask, -100)
        n = float(ids.numel() if mask is None else mask.sum())
        s, t = out.student_logits.float(), out.teacher_logits.float()
        kl = torch.nn.functional.kl_div(
            torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="none"
        ).sum(-1)
        agree = (s.argmax(-1) == t.argmax(-1)).float()
        if mask is not None:
            kl, agree = kl[mask], agree[mask]
        m = self.val_metrics
        m["ce"].update(next_token_cross_entropy(s, labels), weight=n)
        m["teacher_ce"].update(next_token_cross_entropy(t, labels), weight=n)
        m["kl"].update(kl.mean(), weight=n)
        m["top1_agreement"].update(agree.mean(), weight=n)

    def on_validation_epoch_end(self) -> None:
        values = {k: m.compute() for k, m in self.val_metrics.items()}
        for m in self.val_metrics.values():
            m.reset()
        values["ppl"] = values["ce"].exp()
        values["teacher_ppl"] = values["teacher_ce"].exp()
        self.log_dict({f"val/{k}": v for k, v in values.items()}, prog_bar=False)
        self.log("val_ce", values["ce"], prog_bar=True, logger=False)

    # -------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        c = self.optim_cfg
        opt = OPTIMIZERS[c["name"]](
            self.param_groups(float(c["weight_decay"])), lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"]
        )
        total = int(self.trainer.estimated_stepping_batches)
        fn = schedule_fn(
            total, c["warmup_ratio"], c["schedule"], min_ratio=c["min_lr_ratio"], decay_ratio=c["decay_ratio"]
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two named optimizer groups, each parameter under the clone's stable name: ``projections``
        (decayed by ``weight_decay``) and ``gains`` (the student RMSNorm gains, never decayed; any
        other trainable tensor, such as a bias, would join them)."""
        proj = list(self.clone.named_projections())
        taken = {id(p) for _, p in proj}
        rest = [(n, p) for n, p in self.clone.named_trainable() if id(p) not in taken]
        taken |= {id(p) for _, p in rest}
        rest += [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in taken]
        return [
            {"name": "projections", "params": proj, "weight_decay": weight_decay},
            {"name": "gains", "params": rest, "weight_decay": 0.0},
        ]


#: The one source of optimizer defaults: the paper's recipe (Table 10). ``conf/optim/adam.yaml``
#: repeats it and ``conf/optim/demo.yaml`` (the default of lrc-distill) deliberately raises the peak lr
#: and the warm-up for short CPU runs; tests/test_recipes.py fails when a file drifts from this.
OPTIM_DEFAULTS = {
    "name": "adam", "lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
    "schedule": "linear", "warmup_ratio": 0.005, "min_lr_ratio": 0.0, "decay_ratio": 0.2,
}
#: Logging defaults, repeated by the ``log`` block of ``conf/distill.yaml``.
LOG_DEFAULTS = {"per_layer_every_n_steps": 10}


def optim_settings(optim: Mapping[str, Any] | None) -> dict[str, Any]:
    """Optimizer settings over the paper defaults, validated."""
    c = {**OPTIM_DEFAULTS, **_plain(optim)}
    validate_optim(c)
    return c


def validate_optim(c: Mapping[str, Any]) -> None:
    """Clear errors for bad optimizer settings, before any work."""
    from lrc.training.schedules import SCHEDULES

    if c["name"] not in OPTIMIZERS:
        raise ValueError(f"optim.name must be one of {sorted(OPTIMIZERS)}, got {c['name']!r}")
    try:
        lr = float(c["lr"])
    except (TypeError, ValueError):
        lr = math.nan
    if not (math.isfinite(lr) and lr >= 0):  # inf would train NaN weights from the first step
        raise ValueError(f"optim.lr must be >= 0 and finite, got {c['lr']!r}")
    if not 0 <= float(c["warmup_ratio"]) <= 1:
        raise ValueError(f"optim.warmup_ratio must be in [0, 1], got {c['warmup_ratio']!r}")
    if c["schedule"] not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {c['schedule']!r}")
    if float(c["weight_decay"]) < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {c['weight_decay']!r}")
