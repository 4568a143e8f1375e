"""Projection initialisers: a small registry so new schemes plug in by name.

An initialiser is ``fn(param, ctx) -> None`` that fills ``param`` (a ``D x d`` projection) in
place; ``ctx`` tells it which projection it is, which frozen teacher matrices it multiplies and
which teacher RMSNorm gain its input passes through, so data-free schemes (e.g. PCA of the
teacher weights, orthogonal) can be added with :func:`register_projection_init` and selected
with ``CloneConfig(init="name")``.

A data-aware initialiser also registers a ``calibrate`` function: ``LowRankClone.from_teacher``
runs it once on a calibration batch (``calibration_ids``) and hands its :class:`Calibration` to
every projection's context and to the student's RMSNorm gains (``"pca"``, :mod:`lrc.model.pca`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch


@dataclass
class InitContext:
    name: str  # projection name, e.g. "embed", "layers.3.q", "layers.3.gate_up"
    side: Literal["input", "output", "embedding"]  # how the projection multiplies the teacher matrix
    teacher_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)  # e.g. {"wq": Wq}
    generator: torch.Generator | None = None
    std: float = 0.02
    # the teacher RMSNorm gain (D,) in front of an input-side projection: the layer's attention
    # norm for q/k/v, its FFN norm for gate/up, the final norm for the head; None otherwise
    norm_gain: torch.Tensor | None = None
    calibration: Mapping[str, Any] = field(default_factory=dict)  # Calibration.data of a data-aware init


@dataclass
class Calibration:
    """What a data-aware initialiser learned from a calibration batch.

    data:  handed to every projection's :attr:`InitContext.calibration` (e.g. ``{"basis": Q}``).
    gains: student RMSNorm gains by the names of ``LowRankClone.named_student_norms``
           (``final_norm``, ``layers.{i}.attn_norm``, ``layers.{i}.mlp_norm``); a float fills
           the gain, a missing name keeps 1.
    """

    data: dict[str, Any] = field(default_factory=dict)
    gains: dict[str, float | torch.Tensor] = field(default_factory=dict)


ProjectionInit = Callable[[torch.Tensor, InitContext], None]
# calibrate(teacher, calibration_ids, *, rank, student_eps) -> Calibration
Calibrate = Callable[..., Calibration]


@dataclass(frozen=True)
class _InitSpec:
    fn: ProjectionInit
    calibrate: Calibrate | None = None
    untied_head: bool = False


_REGISTRY: dict[str, _InitSpec] = {}


def register_projection_init(
    name: str, *, calibrate: Calibrate | None = None, untied_head: bool = False
) -> Callable[[ProjectionInit], ProjectionInit]:
    """Decorator: make ``fn`` selectable as ``CloneConfig(init=name)``.

    calibrate:   makes the init data-aware: ``calibrate(teacher, calibration_ids, rank=...,
                 student_eps=...) -> Calibration`` runs once before the projections are filled.
    untied_head: the init gives the head a projection of its own, so ``tie_head_projection``
                 defaults to False with it and True is refused.
    """

    def deco(fn: ProjectionInit) -> ProjectionInit:
        _REGISTRY[name] = _InitSpec(fn, calibrate, untied_head)
        return fn

    return deco


def projection_init_names() -> list[str]:
    return sorted(_REGISTRY)


def _spec(init: str | ProjectionInit) -> _InitSpec:
    if callable(init):
        return _InitSpec(init)
    if init not in _REGISTRY:
        raise ValueError(f"unknown CloneConfig.init {init!r}; registered: {projection_init_names()}")
    return _REGISTRY[init]


def get_projection_init(init: str | ProjectionInit) -> ProjectionInit:
    return _spec(init).fn


def init_calibrator(init: str | ProjectionInit) -> Calibrate | None:
    """The ``calibrate`` function of a data-aware init (``None``: the init needs no data)."""
    return _spec(init).calibrate


def init_requires_untied_head(init: str | ProjectionInit) -> bool:
    return _spec(init).untied_head


@register_projection_init("normal")
def normal_init(param: torch.Tensor, ctx: InitContext) -> None:
    """The reference code's initialisation: every entry N(0, std), std = 0.02 by default."""
    with torch.no_grad():
        param.copy_(torch.randn(param.shape, generator=ctx.generator, dtype=torch.float32) * ctx.std)


@register_projection_init("orthogonal")
def orthogonal_init(param: torch.Tensor, ctx: InitContext) -> None:
    """Random semi-orthogonal columns (P^T P = I), the rotation-equivalent start at d = D."""
    with torch.no_grad():
        g = torch.randn(param.shape, generator=ctx.generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        param.copy_(q.to(torch.float32))
