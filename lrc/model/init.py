"""Projection initialisers: a small registry so new schemes plug in by name.

An initialiser is ``fn(param, ctx) -> None`` that fills ``param`` (a ``D x d`` projection) in
place; ``ctx`` tells it which projection it is and which frozen teacher matrices it multiplies,
so data-free schemes (e.g. PCA of the teacher weights, orthogonal) can be added with
:func:`register_projection_init` and selected with ``CloneConfig(init="name")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch


@dataclass
class InitContext:
    name: str  # projection name, e.g. "embed", "layers.3.q", "layers.3.gate_up"
    side: Literal["input", "output", "embedding"]  # how the projection multiplies the teacher matrix
    teacher_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)  # e.g. {"wq": Wq}
    generator: torch.Generator | None = None
    std: float = 0.02


ProjectionInit = Callable[[torch.Tensor, InitContext], None]
_REGISTRY: dict[str, ProjectionInit] = {}


def register_projection_init(name: str) -> Callable[[ProjectionInit], ProjectionInit]:
    """Decorator: make ``fn`` selectable as ``CloneConfig(init=name)``."""

    def deco(fn: ProjectionInit) -> ProjectionInit:
        _REGISTRY[name] = fn
        return fn

    return deco


def projection_init_names() -> list[str]:
    return sorted(_REGISTRY)


def get_projection_init(init: str | ProjectionInit) -> ProjectionInit:
    if callable(init):
        return init
    if init not in _REGISTRY:
        raise ValueError(f"unknown CloneConfig.init {init!r}; registered: {projection_init_names()}")
    return _REGISTRY[init]


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
