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
from lrc.training.schedules import schedule_fn

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN/Inf; names the step and the offending terms."""


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
        optim: ``name`` (adam|adamw), ``lr``, ``betas``, ``eps``, ``weight_decay``, ``schedule``
            (linear|cosine|wsd|constant), ``warmup_ratio``, ``min_lr_ratio``, ``decay_ratio``.
        log: ``per_layer_every_n_steps`` (0 = never).
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
        self.log_cfg = {"per_layer_every_n_steps": 50, **_plain(log)}
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
    def configure_model(self) -> None:
        if self.clone is not None:
            return
        model, tok = self._loaded
        if model is None:
            from lrc.teachers import load_teacher

            model, tok = load_teacher(**self.teacher_cfg)
        self.clone = LowRankClone.from_teacher(model, CloneConfig(**self.student_cfg), tokenizer=tok)
        self.loss_fn.check_layers(self.clone.student_layers)
        self.clone.train(self.training)  # the teacher came in eval mode; nothing here uses dropout
        self._loaded = (None, tok)

    def trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold only what is trained: never the teacher's weights."""
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lrc"] = {
            "tokens_seen": self.tokens_seen,
            "tokens_per_source": dict(self.tokens_per_source),
            "trainable_keys": sorted(keep),
            "config": self.run_config,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self.trainable_keys() - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(f"checkpoint lacks trainable tensors {sorted(missing)[:5]} (different student config?)")
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
                f"(values {[bad[k] for k in worst[:8]]}); last good checkpoint left untouched"
            )
        n_tokens = int(ids.numel() if out.token_mask is None else out.token_mask.sum())
        self.tokens_seen += n_tokens
        self._count_sources(batch)
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

    def _count_sources(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Per-source token counts from ``batch["source_ids"]`` (an index into the data module's
        ``source_names``), logged as ``train/tokens/<source>``."""
        src = batch.get("source_ids")
        names = getattr(getattr(self.trainer, "datamodule", None), "source_names", None) if self._trainer else None
        if src is None or not names:
            return
        counts = torch.bincount(src.flatten().cpu(), minlength=len(names)) * batch["input_ids"].shape[1]
        for name, c in zip(names, counts.tolist()):
            self.tokens_per_source[name] = self.tokens_per_source.get(name, 0) + c
            self.log(f"train/tokens/{name}", float(self.tokens_per_source[name]), on_step=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            self.log("train/grad_norm", norm, on_step=True)
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
        params = [p for p in self.parameters() if p.requires_grad]
        opt = OPTIMIZERS[c["name"]](
            params, lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"], weight_decay=c["weight_decay"]
        )
        total = int(self.trainer.estimated_stepping_batches)
        fn = schedule_fn(
            total, c["warmup_ratio"], c["schedule"], min_ratio=c["min_lr_ratio"], decay_ratio=c["decay_ratio"]
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


OPTIM_DEFAULTS = {
    "name": "adam", "lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
    "schedule": "linear", "warmup_ratio": 0.005, "min_lr_ratio": 0.0, "decay_ratio": 0.2,
}


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
    if not float(c["lr"]) >= 0:
        raise ValueError(f"optim.lr must be >= 0, got {c['lr']!r}")
    if not 0 <= float(c["warmup_ratio"]) <= 1:
        raise ValueError(f"optim.warmup_ratio must be in [0, 1], got {c['warmup_ratio']!r}")
    if c["schedule"] not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {c['schedule']!r}")
    if float(c["weight_decay"]) < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {c['weight_decay']!r}")
