"""``SFTModule``: supervised fine-tuning of a plain causal LM on chat data (a LightningModule).

Full fine-tune: every parameter of the model trains. The loss is next-token cross-entropy on the
tokens the batch labels (``labels`` of :class:`~lrc.data.chat_datamodule.ChatDataModule`: the
assistant's turns), with positions restarting and attention blocked between the conversations
packed into a row (``segment_ids``, as :func:`lrc.methods.kd.run_causal_lm` builds it). It shares
the distillation loop's optimizer settings and schedules (:func:`~lrc.training.module.optim_settings`),
its NaN/Inf checks and its checkpoint rules: a checkpoint holding a non-finite tensor is never
written, and ``checkpoint["lrc"]`` carries the token count, the run config and the class.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from torchmetrics import MeanMetric

from lrc.losses import next_token_cross_entropy
from lrc.methods.kd import run_causal_lm
from lrc.training.module import (
    OPTIMIZERS, NonFiniteLossError, NonFiniteWeightsError, _plain, non_finite, optim_settings,
)
from lrc.training.schedules import schedule_fn

#: SFT optimizer defaults (the paper's SFT recipe): AdamW at 1e-5, linear schedule, 10% warm-up.
#: ``conf/optim/sft.yaml`` repeats them.
SFT_OPTIM = {"name": "adamw", "lr": 1e-5, "warmup_ratio": 0.1, "schedule": "linear", "weight_decay": 0.0}


def load_causal_lm(source: str, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    """A plain transformers causal LM and its tokenizer from a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class SFTModule(L.LightningModule):
    """Fine-tune every parameter of a causal LM on labelled chat batches.

    Args:
        model: a local model directory or hub id (an ``lrc-distill`` export included).
        dtype: parameter dtype the model is loaded in (``float32`` | ``bfloat16`` | ``float16``).
        optim: optimizer settings over :data:`SFT_OPTIM` (keys of
            :data:`~lrc.training.module.OPTIM_DEFAULTS`).
        model_obj, tokenizer: an already loaded model and tokenizer (not saved in hyper-parameters).
        run_config: the full resolved run config, saved in every checkpoint.
    """

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        optim: Mapping[str, Any] | None = None,
        model_obj: torch.nn.Module | None = None,
        tokenizer: Any = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model_obj", "tokenizer", "run_config"])
        self.source, self.dtype_name = str(model), dtype
        self.optim_cfg = optim_settings({**SFT_OPTIM, **_plain(optim)})
        self.run_config = _plain(run_config)
        self._loaded = (model_obj, tokenizer)
        self.tokens_seen = 0  # labelled (trained) tokens, all processes together
        self._step_tokens = 0  # labelled tokens of the optimizer step under way, all processes together
        self._t_last: float | None = None
        self.val_ce = MeanMetric()

    @property
    def tokenizer(self) -> Any:
        return self._loaded[1]

    def configure_model(self) -> None:
        if getattr(self, "lm", None) is not None:
            return
        model, tok = self._loaded
        if model is None:
            model, tok = load_causal_lm(self.source, self.dtype_name)
        model.requires_grad_(True)
        self.lm = model.train(self.training)
        self._loaded = (None, tok)

    # --------------------------------------------------------------------------- training
    def _loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = run_causal_lm(self.lm, batch["input_ids"], batch.get("attention_mask"), batch.get("segment_ids"))
        labels = batch["labels"]
        return next_token_cross_entropy(logits, labels), (labels[:, 1:] != -100).sum()

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Returns the micro-batch's CE summed over its labelled tokens (logs their mean); the step's
        gradient is divided by the step's labelled tokens in :meth:`normalise_step_gradient`."""
        loss, n = self._loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss at step {self.global_step} ({loss.item()}); "
                                     f"nothing from this step was saved")
        n_all = n
        if self._trainer is not None:
            n_all = self.trainer.strategy.reduce(n.to(self.device), reduce_op="sum")
        self.tokens_seen += int(n_all)
        self._step_tokens += int(n_all)
        now = time.perf_counter()
        tps = int(n_all) / (now - self._t_last) if self._t_last is not None else float("nan")
        self._t_last = now
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True)
        if math.isfinite(tps):
            self.log("train/tokens_per_s", tps, on_step=True)
        return loss * n.to(loss.dtype)

    def normalise_step_gradient(self) -> None:
        """Make the step's gradient that of the mean CE over all its labelled tokens (every
        micro-batch on every process), whatever their counts. Each micro-batch returned its summed
        CE; Lightning divided it by ``accumulate_grad_batches`` and DDP / FSDP averaged over the
        processes, so the gradient holds sum / (processes x accumulation): multiply by
        (processes x accumulation) / tokens. A mean per micro-batch would weigh a token of a
        micro-batch with few labelled tokens more than one of a full micro-batch."""
        trainer = self._trainer
        world, accumulate = (trainer.world_size, trainer.accumulate_grad_batches) if trainer is not None else (1, 1)
        scale = world * accumulate / max(self._step_tokens, 1)
        self._step_tokens = 0
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step, then a check that every weight is still finite (before any checkpoint of it)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        bad = non_finite(self.lm.named_parameters())
        if bad:
            raise NonFiniteWeightsError(f"non-finite weights after the optimizer update of step {self.global_step} "
                                        f"({bad[:5]}); nothing from this step was saved")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.normalise_step_gradient()  # before the norm is logged and Lightning clips it
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm_preclip", norm, on_step=True)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        loss, n = self._loss(batch)
        if n > 0:
            self.val_ce.update(loss, weight=float(n))

    def on_validation_epoch_end(self) -> None:
        ce = self.val_ce.compute()
        self.val_ce.reset()
        self.log_dict({"val/ce": ce, "val/ppl": ce.exp()})
        self.log("val_ce", ce, prog_bar=True, logger=False)

    # -------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        c = self.optim_cfg
        decayed = [p for p in self.lm.parameters() if p.ndim >= 2]
        rest = [p for p in self.lm.parameters() if p.ndim < 2]
        groups = [{"name": "matrices", "params": decayed, "weight_decay": float(c["weight_decay"])},
                  {"name": "norms_and_biases", "params": rest, "weight_decay": 0.0}]
        opt = OPTIMIZERS[c["name"]](groups, lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"])
        fn = schedule_fn(int(self.trainer.estimated_stepping_batches), c["warmup_ratio"], c["schedule"],
                         min_ratio=c["min_lr_ratio"], decay_ratio=c["decay_ratio"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = non_finite(checkpoint["state_dict"].items())
        if bad:
            raise NonFiniteWeightsError(f"non-finite weights at step {checkpoint.get('global_step', self.global_step)} "
                                        f"({bad[:5]}); no checkpoint written")
        checkpoint["lrc"] = {"tokens_seen": self.tokens_seen, "config": self.run_config,
                             "method_target": f"{type(self).__module__}.{type(self).__qualname__}"}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = non_finite(checkpoint["state_dict"].items())
        if bad:
            raise ValueError(f"the checkpoint holds non-finite tensors {bad[:5]}")
        self.tokens_seen = int(checkpoint.get("lrc", {}).get("tokens_seen", 0))

    def save_model(self, path: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write the fine-tuned model and its tokenizer as a plain transformers directory, atomically."""
        from lrc.methods.students import save_plain_student

        return save_plain_student(self.lm, path, tokenizer=self.tokenizer, dtype=dtype, overwrite=overwrite,
                                  metadata={"lrc": "sft", "base_model": self.source, "tokens_seen": self.tokens_seen})
