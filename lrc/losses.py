"""The LRC objective (docs/method.md, section 4): CE + KL + alpha * sum of activation-clone MSE terms.

Pure functions do the math (:func:`next_token_cross_entropy`, :func:`kl_divergence`,
:func:`masked_mse`, :func:`layer_clone_terms`); :class:`LRCLoss` weighs and sums them. Training
computes CE and KL with :func:`chunked_ce_kl` (the same values and gradients as the first two, in
place and in few passes over the vocabulary, :func:`ce_kl_rows`), and each MSE with one fused
autograd function.

The clone terms are computed *inside* each decoder layer of the clone (so teacher activations
never outlive their layer and per-layer activation checkpointing stays possible); the layer asks
:func:`layer_clone_terms` for exactly the terms a :class:`TermRequest` names.  ``LRCLoss.request``
is that request for a given :class:`LossConfig`:

    loss_fn = LRCLoss(LossConfig(alpha=0.5))
    out = clone(input_ids, terms=loss_fn.request, logits=loss_fn.wants_logits)
    terms = loss_fn(out, input_ids)

Each term is one function in a registry (:func:`register_clone_term`): ``fn(student, teacher,
ctx) -> scalar``, where ``student``/``teacher`` are one layer's activations and ``ctx`` a
:class:`TermContext`.  A new term is that function plus its weight in ``LossConfig.term_weights``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from lrc.layer_select import LayerSpec, check_layer_spec, plain_layer_spec, select_layers

CLONE_TERMS = ("q", "k", "v", "o", "gate", "up", "down")  # the paper's seven terms (weight 1 by default)
KL_REDUCTIONS = ("sequence_sum", "token_mean")
ATTN_OUT_SPACES = ("teacher", "student")
OUTPUT_ALIGNMENTS = ("free", "learned")
FFN_OUT_SPACES = ("student", "teacher")
SHARED_PROJECTION_CHOICES = ("paper", "reference")
#: per block: the term of a shared (IO) input projection, and the terms it replaces in the
#: reference code's reading (``LossConfig.shared_projection_terms="reference"``)
SHARED_INPUT_TERMS = {"attn": ("attn_in", ("q", "k", "v")), "ffn": ("ffn_in", ("gate", "up"))}


# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------
def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are reduced in fp32; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _SquaredErrorSum(torch.autograd.Function):
    """``sum(((a - b) * m) ** 2) / count`` in three passes over the operands: one difference, kept
    for the backward (masked in place), one dot product; the backward scales it once. Autograd's
    ``(a - b).pow(2).mean()`` makes and keeps more full-size tensors, and a clone forward computes
    one such term per projection per layer."""

    @staticmethod
    def forward(ctx, a, b, mask, count):
        diff = _upcast(a) - _upcast(b)
        if mask is not None:
            diff.mul_(mask.to(diff.dtype))
        flat = diff.reshape(-1)
        ctx.save_for_backward(diff)
        ctx.count, ctx.dtypes = count, (a.dtype, b.dtype)
        return torch.dot(flat, flat) / count

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        g = diff * (2 * grad / ctx.count)
        g_a = g.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        g_b = (-g).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return g_a, g_b, None, None


def masked_mse(a: torch.Tensor, b: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over all elements of the (B, T, ...) tensors; with ``token_mask`` (B, T)
    only valid tokens count (mean over valid tokens x features).

    Half-precision operands (bf16/fp16, e.g. activations under autocast) are upcast first, so the
    difference, the square, the sum and the result are fp32; the token count is an exact integer.
    Computed by one fused autograd function (the same value and gradient as autograd's
    ``(a - b).pow(2).mean()``, with fewer passes over the operands).
    """
    if a.shape != b.shape:
        raise ValueError(f"masked_mse needs operands of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if token_mask is None:
        return _SquaredErrorSum.apply(a, b, None, a.numel())
    dtype = torch.promote_types(_upcast(a[:0]).dtype, _upcast(b[:0]).dtype)
    m = token_mask.reshape(*token_mask.shape, *([1] * (a.dim() - token_mask.dim())))
    count = token_mask.to(torch.int64).sum() * a[0, 0].numel()  # exact, whatever the mask's dtype
    return _SquaredErrorSum.apply(a, b, m, count.clamp_min(1).to(dtype))


def next_token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """CE of ``logits[:, t]`` predicting ``labels[:, t + 1]``, mean over non-ignored targets."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        _upcast(logits[:, :-1]).reshape(-1, vocab),
        labels[:, 1:].reshape(-1),
        ignore_index=ignore_index,
    )


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reduction: str = "sequence_sum",
    tau_squared: bool = False,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL(p_teacher || p_student) of the (B, T, V) logits divided by ``temperature``.

    reduction="sequence_sum": sum over vocabulary and positions, divided by the number of
    sequences B (the reference code; grows with T). reduction="token_mean": mean over positions.
    ``tau_squared`` multiplies by temperature**2. ``token_mask`` (B, T) excludes padded positions.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    log_q = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # (B, T)
    if token_mask is not None:
        per_token = per_token * token_mask.to(per_token.dtype)
    if reduction == "sequence_sum":
        kl = per_token.sum() / student_logits.shape[0]
    else:
        n = per_token.numel() if token_mask is None else token_mask.sum().clamp_min(1)
        kl = per_token.sum() / n
    return kl * temperature**2 if tau_squared else kl


# --------------------------------------------------------------------------------------------
# CE and KL in chunks over positions (LossConfig.logit_chunk_size)
# --------------------------------------------------------------------------------------------
def _chunk_logits(x: torch.Tensor, head: torch.Tensor | None) -> torch.Tensor:
    """Logits of one chunk of positions, in a fresh tensor the caller may overwrite: a copy of ``x``
    itself, or the hidden states ``x`` through ``head``; half precision is upcast to fp32."""
    if head is None:
        return x.to(_upcast(x[:0]).dtype, copy=True)
    return _upcast(F.linear(x, head))


#: bytes of one tile of logit rows that the fused CE/KL passes walk over (fp32 rows): on a CPU small
#: enough for the processor's cache, so the dozen elementwise passes over a row read it from there,
#: not from memory; on other devices (a GPU) large enough that each pass is one long kernel, while
#: bounding the tile's four temporaries
CPU_TILE_BYTES = 1 << 21
DEVICE_TILE_BYTES = 1 << 27


def _tile_rows(z: torch.Tensor) -> int:
    """Rows per tile of :func:`ce_kl_rows` (``CPU_TILE_BYTES`` or ``DEVICE_TILE_BYTES`` of them)."""
    budget = CPU_TILE_BYTES if z.device.type == "cpu" else DEVICE_TILE_BYTES
    return max(1, budget // max(1, z.shape[-1] * z.element_size()))


def ce_kl_rows(
    z: torch.Tensor,
    u: torch.Tensor | None,
    targets: torch.Tensor,
    ce_w: torch.Tensor,
    kl_w: torch.Tensor,
    *,
    w_ce: float,
    w_kl: float,
    temperature: float,
    ignore_index: int = -100,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted CE and KL sums of rows of logits, and their gradient, in place and in few passes.

    ``z`` (N, V): student logits, ``u`` (N, V): teacher logits (``None`` when ``w_kl`` is 0), both
    overwritten; ``targets`` (N,) the token each row predicts or ``ignore_index``; ``ce_w`` / ``kl_w``
    (N,) per-row weights. Returns ``(sum_i ce_w[i] CE_i, sum_i kl_w[i] KL_i)`` with
    ``CE_i = logsumexp(z_i) - z_i[t_i]`` and ``KL_i = KL(softmax(u_i / tau) || softmax(z_i / tau))``;
    with ``need_grad`` ``z`` then holds the gradient of ``w_ce * CE + w_kl * KL`` sums:
    ``w_ce ce_w (softmax(z) - onehot(t)) + w_kl kl_w (softmax(z / tau) - softmax(u / tau)) / tau``.
    Rows are taken a tile at a time (:func:`_tile_rows`: cache-sized on a CPU).
    """
    use_ce, use_kl = w_ce != 0, w_kl != 0
    ce = z.new_zeros(())
    kl = z.new_zeros(())
    step = _tile_rows(z)
    for s in range(0, z.shape[0], step):
        e = min(s + step, z.shape[0])
        zz = z[s:e]
        tgt = targets[s:e]
        valid = tgt != ignore_index
        picked = tgt.clamp_min(0).unsqueeze(-1)
        if use_ce:
            lse = torch.logsumexp(zz, -1)
            ce = ce + ((lse - zz.gather(-1, picked).squeeze(-1)) * ce_w[s:e].to(z.dtype)).masked_fill(~valid, 0).sum()
        if use_kl:
            log_p = torch.log_softmax(u[s:e].div_(temperature), -1)
            p = log_p.exp()
            log_q = torch.log_softmax(zz / temperature, -1)
            kl = kl + (torch.linalg.vecdot(p, log_p.sub_(log_q)) * kl_w[s:e].to(z.dtype)).sum()
        if not need_grad:
            continue
        if use_ce:
            a = (w_ce * ce_w[s:e].to(z.dtype)).masked_fill(~valid, 0).unsqueeze(-1)
            zz.sub_(lse.unsqueeze(-1)).exp_().mul_(a)  # softmax(z) weighted
            zz.scatter_add_(-1, picked, -a)
        else:
            zz.zero_()
        if use_kl:
            zz.addcmul_(log_q.exp_().sub_(p), (w_kl / temperature * kl_w[s:e].to(z.dtype)).unsqueeze(-1))
    return ce, kl


class _ChunkedCEKL(torch.autograd.Function):
    """``w_ce * CE + w_kl * KL`` over positions in chunks of ``chunk`` rows, with its gradient
    computed chunk by chunk in the forward (so no full-vocabulary tensor outlives its chunk, and
    each chunk's logits become their own gradient in place, :func:`ce_kl_rows`).

    Inputs are flattened over positions: ``x_s`` (N, k) student logits (``head_s`` None) or final
    hidden states with ``head_s`` (V, k); the same for the teacher (no gradient). ``targets`` (N,)
    holds the next token of each position or ``ignore_index``; ``ce_w`` / ``kl_w`` (N,) are the
    per-position weights of the two sums (their reductions folded in). Returns (loss, ce, kl); only
    ``loss`` is differentiable.
    """

    @staticmethod
    def forward(ctx, x_s, head_s, x_t, head_t, targets, ce_w, kl_w, w_ce, w_kl, temperature, chunk, ignore_index,
                need_grad):
        n = x_s.shape[0]
        g_x = torch.empty_like(x_s) if need_grad and ctx.needs_input_grad[0] else None
        g_head = None
        if need_grad and head_s is not None and ctx.needs_input_grad[1]:
            g_head = torch.zeros(head_s.shape, dtype=_upcast(head_s[:0]).dtype, device=head_s.device)
        # logits given (not half precision): each chunk's gradient is written over a copy of it in g_x
        in_place = head_s is None and g_x is not None and g_x.dtype == _upcast(g_x[:0]).dtype
        ce = kl = None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z = g_x[s:e].copy_(x_s[s:e]) if in_place else _chunk_logits(x_s[s:e], head_s)
            u = _chunk_logits(x_t[s:e], head_t).to(z.dtype) if w_kl != 0 else None
            ce_c, kl_c = ce_kl_rows(z, u, targets[s:e], ce_w[s:e], kl_w[s:e], w_ce=w_ce, w_kl=w_kl,
                                    temperature=temperature, ignore_index=ignore_index, need_grad=need_grad)
            del u
            ce, kl = (ce_c, kl_c) if ce is None else (ce + ce_c, kl + kl_c)
            if need_grad and not in_place:
                dz = z.to(x_s.dtype if head_s is None else head_s.dtype)
                if head_s is None:
                    if g_x is not None:
                        g_x[s:e] = dz
                else:
                    if g_x is not None:
                        g_x[s:e] = dz @ head_s
                    if g_head is not None:
                        if g_head.dtype == dz.dtype:
                            g_head.addmm_(dz.t(), x_s[s:e])
                        else:
                            g_head += (dz.t() @ x_s[s:e]).to(g_head.dtype)
                del dz
            del z
        if g_head is not None:
            g_head = g_head.to(head_s.dtype)
        ctx.save_for_backward(g_x, g_head)
        loss = w_ce * ce + w_kl * kl
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_kl):  # noqa: ARG004 (ce and kl carry no gradient)
        g_x, g_head = ctx.saved_tensors
        g_x = None if g_x is None else g_x * g_loss.to(g_x.dtype)
        g_head = None if g_head is None else g_head * g_loss.to(g_head.dtype)
        return g_x, g_head, *([None] * 11)


def chunked_ce_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int,
    w_ce: float = 1.0,
    w_kl: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "sequence_sum",
    tau_squared: bool = False,
    token_mask: torch.Tensor | None = None,
    student_head: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_ce * CE + w_kl * KL, CE, KL)`` as :func:`next_token_cross_entropy` and
    :func:`kl_divergence` compute them, with the same values and gradients, but over chunks of
    ``chunk_size`` positions, so at most one chunk of full-vocabulary fp32 tensors exists at a time.

    ``student`` / ``teacher`` are (B, T, V) logits, or, with ``student_head`` / ``teacher_head``
    (V, k), the (B, T, k) final hidden states (normalised) that those heads turn into logits: then
    even the full logits are never materialised, and the gradient reaches the hidden states and the
    student's head. The gradient of every chunk is computed in the forward and kept (the size of
    the inputs, not of the logits); only the first value is differentiable, CE and KL are returned
    detached, for logging. A weight of 0 skips its part (w_kl=0: no teacher logits at all).
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    b, t = student.shape[:2]
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    valid = targets != ignore_index
    ce_w = valid.to(torch.float64) / valid.sum()  # 0/0 = nan when no target, as F.cross_entropy
    kl_w = torch.ones(b, t, dtype=torch.float64, device=student.device)
    if token_mask is not None:
        kl_w = kl_w * token_mask.to(kl_w.dtype)
    if reduction == "sequence_sum":
        kl_w = kl_w / b
    else:
        kl_w = kl_w / (kl_w.numel() if token_mask is None else token_mask.sum().clamp_min(1).to(kl_w.dtype))
    if tau_squared:
        kl_w = kl_w * temperature**2
    need_grad = torch.is_grad_enabled() and (
        student.requires_grad or (student_head is not None and student_head.requires_grad)
    )
    flat = lambda x: x.reshape(b * t, *x.shape[2:])  # noqa: E731
    return _ChunkedCEKL.apply(
        flat(student), student_head, flat(teacher), teacher_head, flat(targets), flat(ce_w), flat(kl_w),
        float(w_ce), float(w_kl), float(temperature), int(chunk_size), ignore_index, need_grad,
    )


# --------------------------------------------------------------------------------------------
# clone terms: a registry of per-layer activation terms
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TermRequest:
    """Which activation-clone terms a clone forward computes, and how.

    terms:  registered term names (:func:`clone_term_names`), computed in this order.
    layers: teacher layer indices that carry clone terms (``None`` = every layer the student keeps).
    attn_out_space: "teacher" compares the student's o_proj output before Po with the teacher's
        o_proj output (width D, the reference code); "student" compares student o_attn with
        teacher o_attn @ Po (width d, the paper).
    detach_down_target / detach_o_target: detach the projected teacher targets o_ffn @ Pdown and
        (student space) o_attn @ Po, so their projection gets gradient from the student side only.
    output_alignment: "free" (the paper's method: the projections align the outputs, as above) or
        "learned" (the paper's "without alignment-free" ablation): each layer's trainable alignment
        matrices A (D x d, ``TermContext.alignments``) map the student's attention and FFN outputs
        to the teacher's width, and o / down compare ``A y_s`` with the teacher's output ``y_t``.
    ffn_out_space: "student" compares the student's FFN output (width d) with teacher o_ffn @ Pdown
        (the paper; the reference code with separate Pgate, Pup); "teacher" compares the student's
        FFN hidden activations through the teacher's own down_proj with the teacher's FFN output
        (width D; Pdown does not appear), as the reference code does with one shared Pgate_up.
        ``LRCLoss`` sets it (``LossConfig.shared_projection_terms``); ignored with learned alignment.
    """

    terms: tuple[str, ...] = CLONE_TERMS
    layers: tuple[int, ...] | None = None
    attn_out_space: str = "teacher"
    detach_down_target: bool = False
    detach_o_target: bool = False
    output_alignment: str = "free"
    ffn_out_space: str = "student"

    def __post_init__(self) -> None:
        unknown = [t for t in self.terms if t not in _TERM_REGISTRY]
        if unknown:
            raise ValueError(f"TermRequest.terms has unknown terms {unknown}; registered: {clone_term_names()}")
        if self.output_alignment not in OUTPUT_ALIGNMENTS:
            raise ValueError(
                f"TermRequest.output_alignment must be one of {OUTPUT_ALIGNMENTS}, got {self.output_alignment!r}"
            )
        if self.ffn_out_space not in FFN_OUT_SPACES:
            raise ValueError(f"TermRequest.ffn_out_space must be one of {FFN_OUT_SPACES}, got {self.ffn_out_space!r}")

    def wants(self, layer: int) -> bool:
        return bool(self.terms) and (self.layers is None or layer in self.layers)

    def covers(self, other: "TermRequest", student_layers: Sequence[int]) -> bool:
        """True if a forward computed for ``self`` holds everything ``other`` needs."""
        mine = set(student_layers) if self.layers is None else set(self.layers)
        theirs = set(student_layers) if other.layers is None else set(other.layers)
        same_how = (
            self.attn_out_space == other.attn_out_space
            and self.detach_down_target == other.detach_down_target
            and self.detach_o_target == other.detach_o_target
            and self.output_alignment == other.output_alignment
            and self.ffn_out_space == other.ffn_out_space
        )
        return set(other.terms) <= set(self.terms) and theirs <= mine and (same_how or not other.terms)


@dataclass(frozen=True)
class TermContext:
    """What a clone-term function may use besides the two layers' activations.

    request:         the :class:`TermRequest` (spaces, detaching).
    teacher_weights: the layer's frozen teacher tensors (keys of :mod:`lrc.model.adapters`:
                     "wq", "wo", "bo", "attn_norm", ...).
    projections:     the layer's projections in compute dtype, by name: "q", "k", "v" (or "qkv"),
                     "o", "gate", "up" (or "gate_up"), "down"; each D x d.
    token_mask:      (B, T) bool of real tokens, or ``None``; pass it to :func:`masked_mse`.
    layer:           the teacher layer index.
    alignments:      with ``output_alignment="learned"``, the layer's alignment matrices in compute
                     dtype: "o" and "down", each D x d (student output width d -> teacher width D).
    """

    request: TermRequest
    teacher_weights: Mapping[str, torch.Tensor]
    projections: Mapping[str, torch.Tensor]
    token_mask: torch.Tensor | None = None
    layer: int | None = None
    alignments: Mapping[str, torch.Tensor] = field(default_factory=dict)


CloneTerm = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], TermContext], torch.Tensor]


@dataclass(frozen=True)
class _RegisteredTerm:
    fn: CloneTerm
    default_weight: float
    reads: frozenset[str] | None = None  # the teacher activations fn reads (None: any of them)


_TERM_REGISTRY: dict[str, _RegisteredTerm] = {}


#: the activations :func:`lrc.model.functional.decoder_layer` returns for each stream
ACTIVATION_KEYS = ("q", "k", "v", "attn", "o", "gate", "up", "ffn_hidden", "down", "attn_input", "ffn_input")


def register_clone_term(
    name: str, *, default_weight: float = 0.0, reads: Sequence[str] | None = None
) -> Callable[[CloneTerm], CloneTerm]:
    """Decorator: make ``fn(student, teacher, ctx) -> scalar`` the clone term ``name``.

    ``student`` / ``teacher`` are one layer's activations (keys q, k, v, attn, o, gate, up,
    ffn_hidden, down, attn_input, ffn_input of :func:`lrc.model.functional.decoder_layer`; widths
    d for the student's o, down and normalised inputs, D for the teacher's), ``ctx`` a
    :class:`TermContext`.  Return an unweighted scalar (use
    :func:`masked_mse` with ``ctx.token_mask``).  ``default_weight`` is the weight when
    ``LossConfig.term_weights`` does not name the term: 0 (off) unless given, 1 for the paper's seven.
    ``reads``: the keys of ``teacher`` the term reads (``None``: possibly any). A clone layer hands
    its terms only the teacher activations some requested term reads (:func:`teacher_activations_read`),
    and frees the rest at once; under ``activation_checkpointing: student`` those are what it keeps
    for the backward. A term that reads an undeclared key fails with a ``KeyError``.
    """
    keys = None if reads is None else frozenset(reads)
    if keys is not None and not keys <= set(ACTIVATION_KEYS):
        raise ValueError(f"clone term {name!r} reads unknown activations {sorted(keys - set(ACTIVATION_KEYS))}; "
                         f"a layer has {list(ACTIVATION_KEYS)}")

    def deco(fn: CloneTerm) -> CloneTerm:
        if not float(default_weight) >= 0:
            raise ValueError(f"default_weight of clone term {name!r} must be >= 0, got {default_weight!r}")
        _TERM_REGISTRY[name] = _RegisteredTerm(fn, float(default_weight), keys)
        return fn

    return deco


def teacher_activations_read(terms: Sequence[str]) -> tuple[str, ...]:
    """The teacher activations the clone terms ``terms`` read (their registered ``reads``; every
    key of :data:`ACTIVATION_KEYS` if one of them did not declare its reads), in that order."""
    wanted: set[str] = set()
    for name in terms:
        reads = _TERM_REGISTRY[name].reads
        if reads is None:
            return ACTIVATION_KEYS
        wanted |= reads
    return tuple(k for k in ACTIVATION_KEYS if k in wanted)


def clone_term_names() -> list[str]:
    """Registered clone terms, in registration order (the paper's seven first)."""
    return list(_TERM_REGISTRY)


def default_term_weight(name: str) -> float:
    return _TERM_REGISTRY[name].default_weight


def _direct_term(name: str) -> CloneTerm:
    def term(student, teacher, ctx: TermContext) -> torch.Tensor:
        return masked_mse(student[name], teacher[name], ctx.token_mask)

    term.__doc__ = f"{name}: the projection outputs live in the shared inner width; compared directly."
    return term


def _projected_target(teacher_out: torch.Tensor, proj: torch.Tensor, detach: bool) -> torch.Tensor:
    return teacher_out @ (proj.detach() if detach else proj)


def _aligned_output_mse(name: str, student, teacher, ctx: TermContext) -> torch.Tensor:
    """output_alignment="learned": the student's output (width d) through the layer's alignment
    matrix A (D x d), ``y_s @ A.T``, against the teacher's output (width D)."""
    return masked_mse(F.linear(student[name], ctx.alignments[name]), teacher[name], ctx.token_mask)


for _name in ("q", "k", "v"):
    register_clone_term(_name, default_weight=1.0, reads=[_name])(_direct_term(_name))


def _output_mse(name: str, hidden: str, weight: str, bias: str, teacher_space: bool, detach: bool,
                student, teacher, ctx: TermContext) -> torch.Tensor:
    """The MSE of a block's output ``name`` ("o" or "down"): with learned alignment, A times the
    student's output vs the teacher's (width D); in teacher space, the student's ``hidden``
    activations (the output matrix's input) through the teacher's ``weight`` / ``bias`` vs the
    teacher's output (width D); otherwise the student's output (width d) vs the teacher's output
    through the block's output projection, ``y_t @ P`` (detached with ``detach``)."""
    if ctx.request.output_alignment == "learned":
        return _aligned_output_mse(name, student, teacher, ctx)
    if teacher_space:
        s = F.linear(student[hidden], ctx.teacher_weights[weight], ctx.teacher_weights.get(bias))
        return masked_mse(s, teacher[name], ctx.token_mask)
    t = _projected_target(teacher[name], ctx.projections[name], detach)
    return masked_mse(student[name], t, ctx.token_mask)


@register_clone_term("o", default_weight=1.0, reads=["o"])
def attention_output_term(student, teacher, ctx: TermContext) -> torch.Tensor:
    """o: teacher space (student heads through the teacher's o_proj vs teacher o_attn, width D)
    or student space (student o_attn vs teacher o_attn @ Po, width d); with learned alignment, A_o
    times student o_attn vs teacher o_attn (width D); see :class:`TermRequest`."""
    r = ctx.request
    return _output_mse("o", "attn", "wo", "bo", r.attn_out_space == "teacher", r.detach_o_target,
                       student, teacher, ctx)


for _name in ("gate", "up"):
    register_clone_term(_name, default_weight=1.0, reads=[_name])(_direct_term(_name))


@register_clone_term("down", default_weight=1.0, reads=["down"])
def ffn_output_term(student, teacher, ctx: TermContext) -> torch.Tensor:
    """down: student o_ffn (width d) vs teacher o_ffn @ Pdown, or (``ffn_out_space="teacher"``)
    the student's FFN hidden activations through the teacher's down_proj vs teacher o_ffn (width
    D); with learned alignment, A_down times student o_ffn vs teacher o_ffn (width D)."""
    r = ctx.request
    return _output_mse("down", "ffn_hidden", "wdown", "bdown", r.ffn_out_space == "teacher", r.detach_down_target,
                       student, teacher, ctx)


def _shared_input_term(name: str, block: str, projection: str, sharing_key: str) -> CloneTerm:
    def term(student, teacher, ctx: TermContext) -> torch.Tensor:
        if projection not in list(ctx.projections):  # by its keys: any Mapping, however __getitem__ fails
            raise ValueError(
                f"clone term {name!r} needs one shared {block} input projection ({sharing_key}=io), but this "
                f"student has separate ones; bind the loss with loss_fn.check_sharing(attn_sharing, ffn_sharing)"
            )
        lifted = F.linear(student[f"{block}_input"], ctx.projections[projection])  # x_s @ P.T: width d -> D
        return masked_mse(lifted, teacher[f"{block}_input"], ctx.token_mask)

    term.__doc__ = (
        f"{name}: the student's normalised {block} input lifted to the teacher's width by the shared "
        f"projection P{projection} (x_s @ P.T) vs the teacher's normalised {block} input (the reference "
        "code's term for a shared input projection)."
    )
    return term


register_clone_term("attn_in", default_weight=1.0, reads=["attn_input"])(
    _shared_input_term("attn_in", "attn", "qkv", "student.attn_sharing"))
register_clone_term("ffn_in", default_weight=1.0, reads=["ffn_input"])(
    _shared_input_term("ffn_in", "ffn", "gate_up", "student.ffn_sharing"))


def layer_clone_terms(
    student: Mapping[str, torch.Tensor],
    teacher: Mapping[str, torch.Tensor],
    request: TermRequest,
    *,
    teacher_weights: Mapping[str, torch.Tensor],
    projections: Mapping[str, torch.Tensor],
    token_mask: torch.Tensor | None = None,
    layer: int | None = None,
    alignments: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Unweighted value of each requested term for one layer, by the registered term functions.

    ``student``/``teacher`` are the activations of :func:`lrc.model.functional.decoder_layer`;
    the other arguments make the :class:`TermContext` every term function receives.
    """
    ctx = TermContext(request, teacher_weights, projections, token_mask, layer, alignments or {})
    return {name: _TERM_REGISTRY[name].fn(student, teacher, ctx) for name in request.terms}


# --------------------------------------------------------------------------------------------
# configuration and the weighted sum
# --------------------------------------------------------------------------------------------
@dataclass
class LossConfig:
    """Every knob of the LRC objective (defaults: the reference code / LRC-1.5B).

    w_ce, w_kl:     weights of next-token CE and of KL(teacher || student).
    alpha:          weight of the summed activation-clone terms (paper: 0.2 or 0.5).
    temperature:    tau of the KL (paper: 40).
    kl_reduction:   "sequence_sum" (reference) or "token_mean".
    kl_tau_squared: multiply the KL by tau**2.
    term_weights:   per-term weights by registered term name (:func:`clone_term_names`); a missing
                    name weighs its registered default (1 for q, k, v, o, gate, up, down; 0, i.e.
                    off, for added terms unless registered otherwise); 0 switches a term off, so
                    it is not even computed.
    clone_layers:   the layers that carry clone terms (``None`` = every kept layer), a layer spec of
                    :mod:`lrc.layer_select`: a list names teacher layers (negative indices count from
                    the teacher's last layer), each of which the student must keep; a pattern
                    (``{"fraction": f}``, ``{"every": k}``, ``{"first": k}``, ``{"last": k}``) picks
                    among the student's kept layers (:func:`resolve_clone_layers`).
    attn_out_space: "teacher" (reference code) or "student" (paper) for the attention-output term.
    detach_down_target, detach_o_target: see :class:`TermRequest`.
    output_alignment: "free" (the paper's LRC) or "learned" (its "without alignment-free" ablation,
                    see :class:`TermRequest`; the clone must be built with the same value).
    shared_projection_terms: the terms of a block whose input projection is shared (IO sharing,
                    ``CloneConfig.attn_sharing`` / ``ffn_sharing`` = "io"). "paper": the same terms
                    as with separate projections (q, k, v; gate, up, down in width d). "reference":
                    the reference code's: IO attention has ``attn_in`` instead of q, k, v; an IO FFN
                    has ``ffn_in`` instead of gate and up, and its ``down`` compares in the teacher's
                    width (``TermRequest.ffn_out_space="teacher"``). ``attn_in`` / ``ffn_in`` are
                    computed only there. For a block with separate projections both choices give
                    the same terms (the reference code's then are the paper's), so "reference" with
                    all/all sharing changes nothing. The terms depend on the student's sharing:
                    :meth:`LRCLoss.check_sharing` binds it.
    logit_chunk_size: CE and KL are computed by :func:`chunked_ce_kl` from the final hidden states
                    and the heads (a clone forward with ``logits=False``, :attr:`LRCLoss.wants_logits`),
                    in chunks of N positions: at most one chunk of full-vocabulary tensors exists at a
                    time, and each chunk's logits become their own gradient in place. ``None`` or 0 =
                    every position of the micro-batch in one chunk (fastest while the (B*T, V) fp32
                    logits of both models fit). Same values and gradients as the autograd functions
                    :func:`next_token_cross_entropy` and :func:`kl_divergence`; ``ce`` and ``kl`` are
                    returned detached, ``loss`` carries the gradient.
    """

    w_ce: float = 1.0
    w_kl: float = 1.0
    alpha: float = 0.2
    temperature: float = 40.0
    kl_reduction: str = "sequence_sum"
    kl_tau_squared: bool = False
    term_weights: dict[str, float] = field(default_factory=dict)
    clone_layers: LayerSpec = None
    attn_out_space: str = "teacher"
    detach_down_target: bool = False
    detach_o_target: bool = False
    output_alignment: str = "free"
    shared_projection_terms: str = "paper"
    logit_chunk_size: int | None = None

    def __post_init__(self) -> None:
        n = self.logit_chunk_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"LossConfig.logit_chunk_size must be null or an integer >= 0 (0 = unchunked), got {n!r}")
        self.term_weights = dict(self.term_weights or {})
        unknown = sorted(set(self.term_weights) - set(clone_term_names()))
        if unknown:
            raise ValueError(f"LossConfig.term_weights has unknown terms {unknown}; allowed: {clone_term_names()}")
        for key in ("w_ce", "w_kl", "alpha"):
            if not float(getattr(self, key)) >= 0:
                raise ValueError(f"LossConfig.{key} must be >= 0, got {getattr(self, key)!r}")
        for name, w in self.term_weights.items():
            if not float(w) >= 0:
                raise ValueError(f"LossConfig.term_weights[{name!r}] must be >= 0, got {w!r}")
        if not float(self.temperature) > 0:
            raise ValueError(f"LossConfig.temperature must be > 0, got {self.temperature!r}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"LossConfig.kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}")
        if self.attn_out_space not in ATTN_OUT_SPACES:
            raise ValueError(
                f"LossConfig.attn_out_space must be one of {ATTN_OUT_SPACES}, got {self.attn_out_space!r}"
            )
        if self.output_alignment not in OUTPUT_ALIGNMENTS:
            raise ValueError(
                f"LossConfig.output_alignment must be one of {OUTPUT_ALIGNMENTS}, got {self.output_alignment!r}"
            )
        if self.shared_projection_terms not in SHARED_PROJECTION_CHOICES:
            raise ValueError(
                f"LossConfig.shared_projection_terms must be one of {SHARED_PROJECTION_CHOICES}, "
                f"got {self.shared_projection_terms!r}"
            )
        if self.output_alignment == "learned":
            moot = [f"{k}={getattr(self, k)!r}" for k, default in
                    (("attn_out_space", "teacher"), ("detach_down_target", False), ("detach_o_target", False))
                    if getattr(self, k) != default]
            if moot:
                raise ValueError(
                    "LossConfig.output_alignment='learned' compares in teacher space: the alignment matrices "
                    f"replace the projected targets, so {', '.join(moot)} would do nothing; leave them at "
                    "their defaults"
                )
        check_layer_spec(self.clone_layers, "LossConfig.clone_layers")
        if self.clone_layers is not None:
            self.clone_layers = (dict(self.clone_layers) if isinstance(self.clone_layers, Mapping)
                                 else tuple(sorted(self.clone_layers)))

    def weight(self, term: str) -> float:
        return float(self.term_weights.get(term, default_term_weight(term)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clone_layers"] = plain_layer_spec(self.clone_layers)
        return d


def resolve_clone_layers(
    spec: LayerSpec, student_layers: Sequence[int], num_teacher_layers: int | None = None
) -> tuple[int, ...] | None:
    """Teacher indices of the layers that carry clone terms, for a student keeping ``student_layers``
    of ``num_teacher_layers`` (``None`` = every kept layer). A list names teacher layers (negative
    ones count from the teacher's end, so they need ``num_teacher_layers``), which the student must
    keep; a pattern picks among the kept layers: ``{"fraction": 0.5}`` of kept ``[0, 2, 4, 6]`` is
    ``(0, 4)``. ``ValueError`` names ``LossConfig.clone_layers``."""
    key = "LossConfig.clone_layers"
    kept = sorted(student_layers)
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return tuple(kept[j] for j in select_layers(spec, len(kept), key))
    check_layer_spec(spec, key)
    if num_teacher_layers is None:
        if min(spec) < 0:
            raise ValueError(f"{key} {list(spec)} has negative indices, which need the teacher's layer count")
        layers = sorted(spec)
    else:
        layers = select_layers(spec, num_teacher_layers, key)
    missing = sorted(set(layers) - set(kept))
    if missing:
        raise ValueError(f"{key} {missing} are not layers the student keeps {kept}")
    return tuple(layers)


def clone_terms_for(
    config: LossConfig, attn_sharing: str | None = None, ffn_sharing: str | None = None
) -> tuple[str, ...]:
    """The clone terms ``config`` computes for a student with this projection sharing ("all" | "io";
    ``None``: not known yet, taken as separate projections), in registry order: every registered
    term of positive weight (none when alpha is 0), where for attention and for the FFN either the
    shared-input term (``attn_in``, ``ffn_in``) or the terms it replaces (q, k, v; gate, up) are
    kept: the shared-input term exactly when ``shared_projection_terms="reference"`` and that
    block's input projection is shared (:data:`SHARED_INPUT_TERMS`)."""
    if not config.alpha > 0:
        return ()
    sharing = {"attn": attn_sharing, "ffn": ffn_sharing}
    dropped: set[str] = set()
    for block, (shared_term, separate_terms) in SHARED_INPUT_TERMS.items():
        reference_io = config.shared_projection_terms == "reference" and sharing[block] == "io"
        dropped |= set(separate_terms) if reference_io else {shared_term}
    return tuple(t for t in clone_term_names() if t not in dropped and config.weight(t) > 0)


class LRCLoss:
    """Weighted LRC objective. ``LRCLoss(cfg)(out, input_ids)`` returns a dict of scalars:

    - ``loss``: w_ce * ce + w_kl * kl + alpha * clone (the tensor to backpropagate);
    - ``ce``, ``kl``;
    - ``clone``: sum over layers and terms of term weight x MSE (before alpha);
    - ``clone/{term}``: that term's unweighted MSE summed over layers;
    - ``clone/{term}/{layer}``: the unweighted MSE of one term in one teacher layer.
    """

    def __init__(self, config: LossConfig | None = None) -> None:
        self.config = config or LossConfig()
        c = self.config
        terms = clone_terms_for(c)
        spec = c.clone_layers
        # a list of teacher layers is the request as it stands; a pattern or a negative index needs
        # the student's layers first (check_layers)
        fixed = spec is None or (not isinstance(spec, Mapping) and min(spec) >= 0)
        self._unbound = bool(terms) and not fixed
        # the reference code's terms depend on the student's sharing (check_sharing)
        self._sharing_unbound = c.shared_projection_terms == "reference" and c.alpha > 0
        self._request = TermRequest(
            terms=terms,
            layers=tuple(spec) if fixed and spec is not None else None,
            attn_out_space=c.attn_out_space,
            detach_down_target=c.detach_down_target,
            detach_o_target=c.detach_o_target,
            output_alignment=c.output_alignment,
        )

    @property
    def wants_logits(self) -> bool:
        """Whether this loss needs the full logits from the forward: never, a clone forward with
        ``logits=False`` hands over the final hidden states and heads instead
        (:class:`lrc.model.clone.HeadInputs`), from which :func:`chunked_ce_kl` computes them chunk
        by chunk (``logit_chunk_size``). A forward's logits are taken as well."""
        return False

    @property
    def request(self) -> TermRequest:
        """The clone terms (and layers) a forward must compute for this loss."""
        if self._sharing_unbound:
            raise ValueError(
                "LossConfig.shared_projection_terms='reference' depends on the student's projection sharing: "
                "call loss_fn.check_sharing(attn_sharing, ffn_sharing) first"
            )
        if self._unbound:
            raise ValueError(
                f"LossConfig.clone_layers={plain_layer_spec(self.config.clone_layers)!r} depends on the student's "
                "layers: call loss_fn.check_layers(clone.student_layers, num_teacher_layers) first"
            )
        return self._request

    def check_layers(
        self, student_layers: Sequence[int], num_teacher_layers: int | None = None
    ) -> tuple[int, ...] | None:
        """Resolve ``clone_layers`` for a student keeping ``student_layers`` of ``num_teacher_layers``
        (:func:`resolve_clone_layers`; ``ValueError`` if they do not fit), bind them into
        :attr:`request` and return them (``None`` = every kept layer)."""
        layers = resolve_clone_layers(self.config.clone_layers, student_layers, num_teacher_layers)
        self._request = replace(self._request, layers=layers)
        self._unbound = False
        return layers

    def check_sharing(self, attn_sharing: str, ffn_sharing: str) -> tuple[str, ...]:
        """Bind the student's projection sharing (``CloneConfig.attn_sharing`` / ``ffn_sharing``,
        "all" | "io") into :attr:`request` and return its terms (:func:`clone_terms_for`). Only
        ``shared_projection_terms="reference"`` depends on it (and needs this call); with an IO
        FFN there, ``down`` compares in the teacher's width, where ``detach_down_target`` has no
        projected target to detach and is refused (``ValueError``)."""
        for key, value in (("attn_sharing", attn_sharing), ("ffn_sharing", ffn_sharing)):
            if value not in ("all", "io"):
                raise ValueError(f"CloneConfig.{key} must be 'all' or 'io', got {value!r}")
        c = self.config
        terms = clone_terms_for(c, attn_sharing, ffn_sharing)
        ffn_teacher = c.shared_projection_terms == "reference" and ffn_sharing == "io"
        if ffn_teacher and c.detach_down_target and "down" in terms:
            raise ValueError(
                "LossConfig.detach_down_target=True does nothing with shared_projection_terms='reference' and "
                "ffn_sharing='io': the down term then compares in the teacher's width, with no Pdown target to "
                "detach; leave it False"
            )
        self._request = replace(self._request, terms=terms, ffn_out_space="teacher" if ffn_teacher else "student")
        self._sharing_unbound = False
        return terms

    def __call__(
        self,
        out: Any,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        c = self.config
        token_mask = getattr(out, "token_mask", None)
        if labels is None:
            labels = input_ids if token_mask is None else input_ids.masked_fill(~token_mask.bool(), -100)
        results: dict[str, torch.Tensor] = {}
        ce_kl, ce, kl = self._ce_kl(out, labels, token_mask)
        results["ce"], results["kl"] = ce, kl

        if self.request.terms:
            missing = sorted(set(self.request.layers or ()) - set(out.student_layers))
            if missing:
                raise ValueError(
                    f"LossConfig.clone_layers {missing} are not layers the student keeps {list(out.student_layers)}"
                )
            if not out.request.covers(self.request, out.student_layers):
                raise ValueError(
                    "the clone output was computed for a different term request; "
                    "call clone(input_ids, terms=loss_fn.request)"
                )
        layers = [
            i for i in out.student_layers if self.request.layers is None or i in self.request.layers
        ]
        clone = ce.new_zeros(())
        for term in self.request.terms:
            per_layer = [out.clone_terms[(i, term)] for i in layers]
            for i, v in zip(layers, per_layer):
                results[f"clone/{term}/{i}"] = v
            summed = torch.stack(per_layer).sum() if per_layer else ce.new_zeros(())
            results[f"clone/{term}"] = summed
            clone = clone + c.weight(term) * summed
        results["clone"] = clone
        results["loss"] = ce_kl + c.alpha * clone
        return results

    def _ce_kl(self, out: Any, labels: torch.Tensor, token_mask: torch.Tensor | None):
        """``(w_ce * ce + w_kl * kl, ce, kl)`` by :func:`chunked_ce_kl`, in chunks of
        ``logit_chunk_size`` positions (all at once when unset), from the forward's head inputs
        (``out.head``) or from its logits."""
        c = self.config
        head = getattr(out, "head", None)
        if out.student_logits is not None:
            s, t, heads = out.student_logits, out.teacher_logits, (None, None)
        elif head is not None:
            s, t, heads = head.student_hidden, head.teacher_hidden, (head.student_head, head.teacher_head)
        else:
            raise ValueError("the clone output holds neither logits nor head inputs")
        return chunked_ce_kl(
            s, t, labels, chunk_size=c.logit_chunk_size or labels.numel(), w_ce=c.w_ce, w_kl=c.w_kl,
            temperature=c.temperature, reduction=c.kl_reduction, tau_squared=c.kl_tau_squared,
            token_mask=token_mask, student_head=heads[0], teacher_head=heads[1],
        )
