"""The Low-Rank Clone method (``method=lrc``, the default): :class:`~lrc.model.LowRankClone` trained
with :class:`~lrc.losses.LRCLoss` in the shared loop of :class:`~lrc.training.module.DistillModule`.

Its student is the clone's projections and gains (``student``: :class:`~lrc.model.CloneConfig`), its
loss every knob of :class:`~lrc.losses.LossConfig` (``loss``); the export merges the products into a
plain transformers model.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from lrc.losses import LossConfig, LRCLoss, TermRequest
from lrc.model import CloneConfig, LowRankClone
from lrc.model.export import student_config
from lrc.model.init import init_calibrator
from lrc.training.module import DistillModule


class LRCModule(DistillModule):
    """Distil a teacher into a low-rank clone (``student``: :class:`CloneConfig` keyword arguments,
    ``loss``: :class:`LossConfig` keyword arguments; the rest as :class:`DistillModule`)."""

    default_name = "lrc"
    model_attr = "clone"  # checkpoint keys: clone.io.proj_embed, clone.layers.0.proj.q, ...
    loss_config = LossConfig
    param_group_names = ("projections", "gains")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loss_fn = LRCLoss(self.loss_settings)

    @classmethod
    def check_settings(cls, teacher_config: Any, student: Mapping[str, Any], loss: Mapping[str, Any]) -> None:
        config = CloneConfig(**student)
        config.validate_for(teacher_config)
        n = int(teacher_config.num_hidden_layers)
        loss_fn = LRCLoss(LossConfig(**loss))
        loss_fn.check_sharing(config.attn_sharing, config.ffn_sharing)
        loss_fn.check_layers(config.kept_layers(n), n)

    def build_model(self, teacher: nn.Module, tokenizer: Any, restoring: bool) -> LowRankClone:
        """The clone; ``restoring`` skips the init and a data-aware init's calibration."""
        config = CloneConfig(**self.student_cfg)
        self.loss_fn.check_sharing(config.attn_sharing, config.ffn_sharing)  # before any work
        ids = None if restoring else self._calibration_ids(config)
        clone = LowRankClone.from_teacher(
            teacher, config, tokenizer=tokenizer, calibration_ids=ids, restoring=restoring,
            output_alignment=self.loss_fn.config.output_alignment,
        )
        self.loss_fn.check_layers(clone.student_layers, clone.arch.num_layers)
        return clone

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

    def forward_options(self, training: bool) -> dict[str, Any]:
        # training: exactly the clone terms the loss weighs; validation: logits only
        # the training forward hands the loss hidden states and heads, not logits (LRCLoss.wants_logits)
        if not training:
            return {"terms": TermRequest(terms=())}
        return {"terms": self.loss_fn.request, "logits": self.loss_fn.wants_logits}

    def loss_terms(self, out: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.loss_fn(out, batch["input_ids"], labels=batch.get("labels"))

    def decayed_parameters(self) -> list[tuple[str, nn.Parameter]]:
        # the projections, and the alignment matrices of output_alignment=learned (matrices too)
        return [*self.clone.named_projections(), *self.clone.named_alignments()]

    def deployed_config(self) -> Any:
        return student_config(self.clone)
