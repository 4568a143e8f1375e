"""Activation checkpointing of decoder layers (``trainer.strategy.activation_checkpointing``).

"full" recomputes a whole layer in backward; for a clone layer that is both the frozen teacher layer
and the student layer. "student" keeps the teacher layer out of the recomputation: it runs once, and
only the teacher activations the layer's clone terms compare against are kept
(:func:`lrc.losses.teacher_activations_read`), while the student stream and its terms are recomputed
(:attr:`lrc.model.layers.CloneDecoderLayer.recompute_student`). Both give the values and gradients of
keeping every activation.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lrc.model.layers import CloneDecoderLayer


#: ``activation_checkpointing`` settings: keep every activation ("off"), recompute each decoder layer
#: whole in backward ("full"), or recompute only the student stream of each clone layer ("student")
CHECKPOINTING_MODES = ("off", "full", "student")


def checkpointing_mode(value: Any) -> str:
    """``activation_checkpointing`` as one of :data:`CHECKPOINTING_MODES` (``false`` = "off",
    ``true`` = "full")."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "full"
    if value not in CHECKPOINTING_MODES:
        raise ValueError(f"activation_checkpointing must be false, true or one of {CHECKPOINTING_MODES}, "
                         f"got {value!r}")
    return value


def apply_activation_checkpointing(units: list[nn.Module], mode: Any) -> None:
    """Make each unit (:func:`lrc.training.distributed.sharding_units`) recompute its activations in
    backward instead of keeping them. "full": the whole unit (a clone layer recomputes the teacher's
    layer too, about one more forward of both models). "student": a clone layer runs the frozen teacher layer once and
    keeps only the teacher activations its clone terms read (the targets, about 2x the inner widths
    per token and layer in the compute dtype), recomputing the student stream and its terms; other
    units (a baseline's layers) are recomputed whole, like "full". Call it before ``fully_shard``."""
    from torch.distributed._composable.checkpoint_activation import checkpoint

    mode = checkpointing_mode(mode)
    if mode == "off":
        return
    for unit in units:
        if mode == "student" and isinstance(unit, CloneDecoderLayer):
            unit.recompute_student = True
        else:
            checkpoint(unit)
