"""The data-aware initialisation ``init: pca``: one basis of the teacher's residual stream.

Let ``x`` be the teacher's residual stream (width D) where it enters an RMSNorm, and
``n = x / rms_D(x)`` it normalised without gain (``rms_D(x) = sqrt(mean(x^2) + eps_t)``, as the
norm computes it). :func:`pca_basis` returns ``Q`` (D x d, orthonormal columns): the top-d
eigenvectors of the second moment ``E[n n^T]`` over every token of a calibration batch and over
the inputs of every layer's attention norm and FFN norm.  Then, with the student stream meant to
be ``x_s = Q^T x``:

- embedding and output side (``embed``, ``o``, ``down``): ``P = Q``, so the student embeds
  ``Q^T e`` and adds ``Q^T o`` to its stream, exactly the teacher's contributions projected;
- input side (q, k, v / qkv behind the attention norm with gain ``g``; gate, up / gate_up
  behind the FFN norm): ``P = diag(g) Q``, which folds the teacher's gain into the projection;
- head: ``P = diag(g_final) Q``, the final norm's gain folded in the same way.  The embedding's
  projection has no gain, so the two differ: the head's projection must be untied
  (``tie_head_projection`` defaults to False with this init; True is refused);
- student RMSNorm gains: a constant ``c`` per norm, the mean over calibration tokens of the RMS
  ratio ``rms_d(Q^T x) / rms_D(x)`` (:func:`rms_ratios`).

Why that gain: a student norm computes ``c * u / a`` with ``u = Q^T x`` and ``a = rms_d(u)``,
and the input-side weight ``W diag(g) Q`` turns it into ``W diag(g) Q Q^T x * c / a``, while the
teacher computes ``W diag(g) x / b`` with ``b = rms_D(x)``.  ``Q Q^T x`` is the part of ``x``
that the student keeps, so the two agree when ``c / a = 1 / b``.  The constant ``c`` that
minimises ``E || c u / a - u / b ||^2`` is ``E[|u|^2 / (a b)] / E[|u|^2 / a^2] = E[a / b]``
(``|u|^2 = d a^2`` up to eps), the mean RMS ratio.  When ``Q`` keeps a fraction ``f`` of the
stream's energy, ``a / b = sqrt(f D / d)``.  At d = D, ``Q`` is orthogonal, ``|Q^T x| = |x|``,
``a = b`` (with the teacher's eps) and ``c = 1``: every student activation is the teacher's
(rotated by ``Q`` in the stream), so the student reproduces the teacher's logits.

The statistics come from the unmodified teacher (hooks on its RMSNorm modules), so they do
not depend on which layers the student keeps.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from lrc.model.init import Calibration, InitContext, register_projection_init


def _check_ids(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    vocab = teacher.get_input_embeddings().weight.shape[0]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"calibration_ids must be a non-empty (sequences, tokens) tensor of token ids, got {shape}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"calibration_ids must hold integer token ids, got dtype {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"calibration_ids must be token ids in [0, {vocab - 1}], got [{int(ids.min())}, {int(ids.max())}]")
    return ids.to(device=teacher.get_input_embeddings().weight.device, dtype=torch.long)


_FINAL = "final_norm"  # the final norm's site name (the student's final gain)


def _norm_sites(teacher: nn.Module, final: bool) -> Iterator[tuple[str, nn.Module]]:
    """The teacher's RMSNorm modules under the names of the student gains they correspond to."""
    for i, layer in enumerate(teacher.model.layers):
        yield f"layers.{i}.attn_norm", layer.input_layernorm
        yield f"layers.{i}.mlp_norm", layer.post_attention_layernorm
    if final:
        yield _FINAL, teacher.model.norm


@torch.no_grad()
def _visit_norm_inputs(
    teacher: nn.Module, ids: torch.Tensor, final: bool, visit: Callable[[str, torch.Tensor], None], batch_size: int
) -> None:
    """Run the teacher's base model on ``ids`` (no LM head) and call ``visit(site, x)`` with every
    RMSNorm input ``x`` as fp32 (tokens, D)."""
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: visit(name, args[0].detach().float().reshape(-1, args[0].shape[-1]))
        )
        for name, module in _norm_sites(teacher, final)
    ]
    try:
        for chunk in ids.split(batch_size):
            teacher.model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row RMS as RMSNorm computes it (fp32 statistics, eps inside the root)."""
    return torch.sqrt(x.pow(2).mean(-1) + eps)


def residual_second_moment(
    teacher: nn.Module, ids: torch.Tensor, *, batch_size: int = 8,
    keep: list[tuple[str, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, int]:
    """``(sum of n n^T, count)`` in fp64 over every token of ``ids`` and every attention- and
    FFN-norm input ``x`` of the teacher, ``n = x / rms_D(x)`` (normalised without gain). With
    ``keep`` (a list), every norm input of the pass, the final norm's included, is appended to it
    as ``(site, x)`` in the order :func:`rms_ratios` would visit them."""
    ids = _check_ids(teacher, ids)
    eps = float(teacher.config.rms_norm_eps)
    d_model = teacher.config.hidden_size
    acc = {"m": torch.zeros(d_model, d_model, dtype=torch.float64, device=ids.device), "count": 0}

    def visit(site: str, x: torch.Tensor) -> None:
        if keep is not None:
            keep.append((site, x))
        if site == _FINAL:
            return
        n = x / _rms(x, eps)[:, None]
        acc["m"] += (n.t() @ n).double()
        acc["count"] += n.shape[0]

    _visit_norm_inputs(teacher, ids, keep is not None, visit, batch_size)
    return acc["m"], acc["count"]


def top_eigenvectors(m: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` eigenvectors of the symmetric ``m`` with the largest eigenvalues, in decreasing
    order, each signed so that its largest-magnitude entry is positive (a deterministic basis)."""
    _, vecs = torch.linalg.eigh(m.double())
    q = vecs.flip(-1)[:, :rank]
    pivot = q.abs().argmax(0)
    signs = torch.sign(q[pivot, torch.arange(rank, device=q.device)])
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def _check_rank(teacher: nn.Module, rank: int) -> None:
    d_model = teacher.config.hidden_size
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d_model:
        raise ValueError(f"rank must be an integer in [1, {d_model}], got {rank!r}")


def pca_basis(
    teacher: nn.Module, ids: torch.Tensor, rank: int, *, batch_size: int = 8,
    keep: list[tuple[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """``Q`` (D x rank, fp32, orthonormal columns): the top-``rank`` eigenvectors of the second
    moment of the teacher's RMS-normalised residual stream at every layer's attention- and
    FFN-norm input, over the calibration token ids ``ids`` (sequences x tokens). ``keep``: see
    :func:`residual_second_moment`."""
    _check_rank(teacher, rank)
    m, _ = residual_second_moment(teacher, ids, batch_size=batch_size, keep=keep)
    return top_eigenvectors(m, rank).float()


def rms_ratios(
    teacher: nn.Module, ids: torch.Tensor, basis: torch.Tensor, student_eps: float, *, batch_size: int = 8,
    kept: list[tuple[str, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Per RMSNorm of the teacher (named like the student's gains), the mean over the tokens of
    ``ids`` of ``rms_d(x Q) / rms_D(x)``: the least-squares student gain (see the module doc).
    ``kept``: the norm inputs of ``ids`` kept by an earlier pass (:func:`residual_second_moment`),
    read instead of running the teacher again (the same numbers)."""
    ids = _check_ids(teacher, ids)
    eps = float(teacher.config.rms_norm_eps)
    q = basis.to(device=ids.device, dtype=torch.float32)
    sums: dict[str, list] = {}

    def visit(site: str, x: torch.Tensor) -> None:
        ratio = _rms(x @ q, student_eps) / _rms(x, eps)
        s = sums.setdefault(site, [0.0, 0])
        s[0] += ratio.double().sum().item()
        s[1] += ratio.numel()

    if kept is None:
        _visit_norm_inputs(teacher, ids, True, visit, batch_size)
    else:
        for site, x in kept:
            visit(site, x)
    return {site: total / count for site, (total, count) in sums.items()}


#: :func:`pca_calibration` keeps the teacher's norm inputs from the basis's pass for the gains (one
#: teacher pass over the calibration ids instead of two) when they take at most this many bytes
KEEP_NORM_INPUTS_BYTES = 2**30


def pca_calibration(
    teacher: nn.Module, ids: torch.Tensor, *, rank: int, student_eps: float,
    keep_bytes: int = KEEP_NORM_INPUTS_BYTES,
) -> Calibration:
    """The calibration of ``init: pca``: the basis (``data["basis"]``) and the student gains, from
    one teacher pass over ``ids`` when its norm inputs (fp32, every token at every norm) fit in
    ``keep_bytes``, else from two."""
    _check_rank(teacher, rank)
    ids = _check_ids(teacher, ids)
    sites = 2 * len(teacher.model.layers) + 1
    fits = ids.numel() * sites * teacher.config.hidden_size * 4 <= keep_bytes
    kept: list[tuple[str, torch.Tensor]] | None = [] if fits else None
    basis = pca_basis(teacher, ids, rank, keep=kept)
    return Calibration(data={"basis": basis}, gains=rms_ratios(teacher, ids, basis, student_eps, kept=kept))


@register_projection_init("pca", calibrate=pca_calibration, untied_head=True)
def pca_init(param: torch.Tensor, ctx: InitContext) -> None:
    """``P = Q`` (embedding, o, down) or ``P = diag(g) Q`` (input side and head, ``g`` the teacher
    norm gain in front of it); ``Q`` from :func:`pca_calibration`."""
    basis = ctx.calibration.get("basis")
    if basis is None:
        raise ValueError(
            "CloneConfig.init='pca' needs calibration data: build the clone with "
            "LowRankClone.from_teacher(teacher, config, calibration_ids=<(sequences, tokens) token ids>)"
        )
    if tuple(basis.shape) != tuple(param.shape):
        raise ValueError(f"pca basis of shape {tuple(basis.shape)} does not fit projection {ctx.name} {tuple(param.shape)}")
    p = basis.double()
    if ctx.norm_gain is not None:
        p = ctx.norm_gain.detach().double().to(p.device)[:, None] * p
    with torch.no_grad():
        param.copy_(p.to(device=param.device, dtype=param.dtype))
