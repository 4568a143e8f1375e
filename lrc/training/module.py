"""``DistillModule``: the training loop every distillation method shares (a LightningModule), and
:func:`method_class`, which finds a method's subclass by the name its config or checkpoint records.
The methods themselves live in :mod:`lrc.methods` (``lrc``, ``kd``, ``tinybert``)."""

from __future__ import annotations

import importlib
import inspect
import math
import time
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping

import lightning as L
import torch
from torchmetrics import MeanMetric

from lrc.losses import next_token_cross_entropy
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
    one host sync for all of them. Sharded tensors (DTensors) are checked shard by shard and the
    verdict is agreed by every process (a collective: all of them call this together)."""
    named = [(n, t) for n, t in named if torch.is_tensor(t) and t.is_floating_point()]
    if not named:
        return []
    from lrc.training.distributed import all_ranks_min, any_distributed, local

    flags = torch.stack([torch.isfinite(local(t.detach())).all() for _, t in named])
    if any_distributed(t for _, t in named):  # shards (FSDP2): every process must agree
        flags = all_ranks_min(flags.to(torch.int32)).bool()
    flags = flags.cpu()
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
    """The training loop every distillation method shares: the optimizer (two named parameter
    groups), the learning-rate schedule, logging, token counting, validation metrics, the NaN/Inf
    checks and checkpoints that hold only what trains. It knows nothing of the method: a subclass,
    one per method (``lrc/methods/<name>.py``, named by ``method._target_`` in the config), sets
    :attr:`loss_config` and implements the hooks :meth:`check_settings`, :meth:`build_model`,
    :meth:`loss_terms` and :meth:`deployed_config` (and, where the defaults do not fit,
    :meth:`forward_options` and :meth:`decayed_parameters`). Keyword options its own ``__init__``
    adds are the config's ``method.<key>`` (:meth:`method_options`).

    The model a method builds takes ``(input_ids, attention_mask, segment_ids=..., **forward_options)``
    and returns an object with ``student_logits``, ``teacher_logits`` and ``token_mask``; it has
    ``named_trainable()`` and ``save_student(path, dtype=, overwrite=)``.

    Args:
        teacher: keyword arguments of :func:`lrc.teachers.load_teacher` (``source``, ``dtype``...).
        student: keyword arguments of :class:`~lrc.model.CloneConfig` (``rank``, layers... the
            student's shape, shared by every method; sharing and init are the clone's).
        loss: keyword arguments of the method's :attr:`loss_config`.
        optim: ``name`` (adam|adamw), ``lr``, ``betas``, ``eps``, ``weight_decay`` (the method's
            :meth:`decayed_parameters` only), ``schedule`` (linear|cosine|wsd|constant),
            ``warmup_ratio``, ``min_lr_ratio``, ``decay_ratio``; missing keys take
            :data:`OPTIM_DEFAULTS` (the paper's recipe, repeated by ``conf/optim/adam.yaml``).
        log: ``per_layer_every_n_steps`` (0 = never); missing keys take :data:`LOG_DEFAULTS`.
        document_mask: use the batch's ``segment_ids`` to stop attention across documents.
        teacher_model, tokenizer: an already loaded teacher (not saved in hyper-parameters);
            when absent, ``configure_model`` loads it from ``teacher``.
        run_config: the full resolved run config (lrc-distill's), saved in every checkpoint.
        name: the name ``metrics.json`` records as ``method`` (default :attr:`default_name`).
    """

    #: what ``metrics.json`` calls the method when the config gives no ``method.name``
    default_name: ClassVar[str] = ""
    #: the attribute the built model is registered under: the prefix of its checkpoint keys
    model_attr: ClassVar[str] = "net"
    #: the dataclass of the method's ``loss`` settings (its fields are the keys ``loss`` may hold)
    loss_config: ClassVar[type]
    #: names of the two optimizer groups: decayed by ``optim.weight_decay``, and never decayed
    param_group_names: ClassVar[tuple[str, str]] = ("decayed", "not_decayed")

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
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher_model", "tokenizer", "run_config"])
        self.run_config = _plain(run_config)  # the whole resolved config, stored in checkpoints
        self.teacher_cfg = _plain(teacher)
        self.student_cfg = _plain(student)
        self.loss_settings = self.loss_config(**_plain(loss))
        self.optim_cfg = optim_settings(optim)
        self.log_cfg = {**LOG_DEFAULTS, **_plain(log)}
        self.document_mask = document_mask
        self.method_name = str(name or self.default_name or type(self).__name__)
        # kept out of nn.Module registration: the model shares (not copies) these weights
        self._loaded = (teacher_model, tokenizer)
        self.tokens_seen = 0
        self.tokens_per_source: dict[str, int] = {}  # training tokens seen, by data source
        self._t_last: float | None = None
        self._step_terms: dict[str, torch.Tensor] = {}  # this optimizer step's loss terms, summed over micro-batches
        self._step_micro_batches = 0
        self.val_metrics = torch.nn.ModuleDict(
            {k: MeanMetric() for k in ("ce", "teacher_ce", "kl", "top1_agreement")}
        )

    # ------------------------------------------------------------------------ method hooks
    @classmethod
    def check_settings(cls, teacher_config: Any, student: Mapping[str, Any], loss: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the key for ``student`` / ``loss`` settings this method cannot
        train against a teacher of ``teacher_config`` (a transformers config: no weight is needed).
        lrc-distill calls it before anything is loaded or written."""
        raise NotImplementedError

    def build_model(self, teacher: torch.nn.Module, tokenizer: Any, restoring: bool) -> torch.nn.Module:
        """The model to train around the loaded ``teacher``. ``restoring=True`` (lrc-export): its
        trainable tensors come from a checkpoint next, so an expensive init may be skipped."""
        raise NotImplementedError

    def loss_terms(self, out: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"loss": the tensor to backpropagate, ...}`` for one batch. Keys with at most one
        ``/`` are logged every step as ``train/<key>``; keys with two (``<kind>/<term>/<layer>``) every
        ``log.per_layer_every_n_steps`` steps as ``train_layers/<key>``."""
        raise NotImplementedError

    def forward_options(self, training: bool) -> dict[str, Any]:
        """Extra keyword arguments of the model's forward in training (``True``) and validation."""
        return {}

    def decayed_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trainable tensors ``optim.weight_decay`` applies to (default: every trainable matrix;
        norm gains and biases are never decayed)."""
        return [(n, p) for n, p in self.model.named_trainable() if p.ndim >= 2]

    def deployed_config(self) -> Any:
        """The transformers config of the exported student."""
        raise NotImplementedError

    @classmethod
    def method_options(cls) -> dict[str, Any]:
        """The keys the ``method`` config node may hold besides ``_target_``: ``name`` and the
        keyword parameters a subclass's ``__init__`` adds, with their annotations."""
        options: dict[str, Any] = {"name": str | None}
        for klass in cls.__mro__:
            if klass is DistillModule:
                break
            if "__init__" not in vars(klass):
                continue
            hints = typing.get_type_hints(klass.__init__)
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    options.setdefault(p.name, hints.get(p.name, Any))
        return options

    # ------------------------------------------------------------------------------ model
    @property
    def model(self) -> torch.nn.Module | None:
        """The model :meth:`build_model` built (``None`` before :meth:`configure_model`)."""
        return self._modules.get(self.model_attr)

    def configure_model(self, restoring: bool = False) -> None:
        """Build the model (Lightning calls this before fitting). ``restoring=True`` (lrc-export):
        its trainable tensors come from a checkpoint next (see :meth:`build_model`).

        Under ``trainer=fsdp`` the strategy then shards the model
        (:meth:`lrc.training.distributed.FSDP2Strategy.parallelize`: one unit per decoder layer,
        teacher weights included, then the root); other strategies leave it whole."""
        if self.model is None:
            model, tok = self._loaded
            if model is None:
                from lrc.teachers import load_teacher

                model, tok = load_teacher(**self.teacher_cfg)
            self.add_module(self.model_attr, self.build_model(model, tok, restoring))
            self.model.train(self.training)  # the teacher came in eval mode; nothing here uses dropout
            self._loaded = (None, tok)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if hasattr(strategy, "parallelize"):
            strategy.parallelize(self)

    def save_student(self, path: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write the plain transformers student (with tokenizer and generation config) to ``path``."""
        return self.model.save_student(path, dtype=dtype, overwrite=overwrite)

    def deployed_parameter_count(self) -> int:
        """Parameters of the exported student, counted on the meta device (nothing is allocated; a
        tied embedding and head count once)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            student = AutoModelForCausalLM.from_config(self.deployed_config())
        return sum(p.numel() for p in student.parameters())

    def trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold only what is trained: never the teacher's weights; ``checkpoint["lrc"]``
        adds the token counts, the run config and the method's class (``method_target``, which
        lrc-export rebuilds). A checkpoint whose trainable tensors are not all finite is refused
        here, before anything is written."""
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
            "method_target": f"{type(self).__module__}.{type(self).__qualname__}",  # what lrc-export rebuilds
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
    def _forward(self, batch: Mapping[str, torch.Tensor], training: bool):
        seg = batch.get("segment_ids") if self.document_mask else None
        return self.model(batch["input_ids"], batch.get("attention_mask"), segment_ids=seg,
                          **self.forward_options(training))

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        out = self._forward(batch, training=True)
        terms = self.loss_terms(out, batch)
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
        for k, v in terms.items():  # logged once per optimizer step (_log_step_terms)
            self._step_terms[k] = self._step_terms.get(k, 0.0) + v.detach().float()
        self._step_micro_batches += 1
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True)
        if math.isfinite(tps):
            self.log("train/tokens_per_s", tps, on_step=True)
            self.log("tok/s", tps, prog_bar=True, logger=False)
        return loss

    def _log_step_terms(self) -> None:
        """Log the loss terms of the optimizer step that just ran its last backward: each term's
        mean over the step's micro-batches on every process, with one all-reduce. Every micro-batch
        weighs the same in the gradient too (Lightning divides each by the accumulation count,
        DDP / FSDP average over processes), so the logged loss is the loss whose gradient the step
        applies, and a global batch gives the same numbers on 1 process or N. lrc's batches are
        fixed-shape packed sequences (``seq_len`` tokens each, no padding, so ``token_mask`` is None)
        and the data modules cut every epoch into whole steps of full micro-batches
        (:func:`lrc.data.resume.check_whole_steps`), so every micro-batch holds the same number of
        tokens and this mean of means is the token-weighted mean of the global batch."""
        if not self._step_terms:
            return
        keys = list(self._step_terms)
        sums = torch.stack([self._step_terms[k] for k in keys])
        sums = torch.cat([sums, sums.new_tensor([float(self._step_micro_batches)])])
        if self._trainer is not None:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = dict(zip(keys, (sums[:-1] / sums[-1]).unbind()))
        self._step_terms, self._step_micro_batches = {}, 0
        self.log_dict({f"train/{k}": v for k, v in means.items() if k.count("/") <= 1},
                      prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", means["loss"], prog_bar=True, logger=False)
        every = int(self.log_cfg.get("per_layer_every_n_steps") or 0)
        if every and self.global_step % every == 0 and self.loggers:
            # straight to the loggers: self.log would repeat the last value on every later step
            per_layer = {f"train_layers/{k}": v.item() for k, v in means.items() if k.count("/") == 2}
            if self.trainer.is_global_zero:
                for logger in self.loggers:
                    logger.log_metrics(per_layer, step=self.global_step)

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
            from lrc.training.distributed import any_distributed

            if any_distributed(grads):  # FSDP2 shards: the norm of the whole gradient, on every process
                norm = torch.nn.utils.get_total_norm(grads)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            else:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm_preclip", norm, on_step=True)
        self._log_step_terms()
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True)

    # ------------------------------------------------------------------------- validation
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        out = self._forward(batch, training=False)
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
        """Two optimizer groups named by :attr:`param_group_names`, each parameter under the model's
        own name (``named_trainable``): the method's :meth:`decayed_parameters` (decayed by
        ``weight_decay``), then every other trainable tensor (never decayed). For ``lrc`` these are
        ``projections`` and ``gains`` (the student RMSNorm gains)."""
        decayed = list(self.decayed_parameters())
        taken = {id(p) for _, p in decayed}
        rest = [(n, p) for n, p in self.model.named_trainable() if id(p) not in taken]
        taken |= {id(p) for _, p in rest}
        rest += [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in taken]
        names = self.param_group_names
        return [
            {"name": names[0], "params": decayed, "weight_decay": weight_decay},
            {"name": names[1], "params": rest, "weight_decay": 0.0},
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
#: The method of a config or checkpoint that names none (those written before methods were a choice).
DEFAULT_METHOD = "lrc.methods.lrc.LRCModule"


def method_class(target: str | None) -> type[DistillModule]:
    """The :class:`DistillModule` subclass ``target`` (``package.module.Class``, a config's
    ``method._target_`` or a checkpoint's ``method_target``) names; ``None``: :data:`DEFAULT_METHOD`.
    ``ValueError`` naming ``target`` when it cannot be imported or is not a method."""
    target = str(target or DEFAULT_METHOD)
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"method._target_={target!r} cannot be imported: {err}") from None
    if not (inspect.isclass(obj) and issubclass(obj, DistillModule) and hasattr(obj, "loss_config")):
        raise ValueError(
            f"method._target_={target!r} is not a distillation method (a subclass of "
            f"lrc.training.module.DistillModule with a loss_config)"
        )
    return obj


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
