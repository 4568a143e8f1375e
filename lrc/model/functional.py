"""Pure tensor functions for one decoder layer of a Llama/Qwen2/Qwen3 network.

The same :func:`decoder_layer` runs the teacher stream (teacher weights, width D) and the student
stream (merged weights, width d): the two can only differ through their weights.  RoPE is
applied with transformers' own ``apply_rotary_pos_emb`` on the teacher's cos/sin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

Weights = Mapping[str, torch.Tensor | None]


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float


class Lift:
    """``x @ P.T`` (width d -> D) for the input-side matrices that share one projection ``P``,
    computed once per input and reused by every matrix of the group (one forward's lifetime)."""

    def __init__(self, proj: torch.Tensor) -> None:
        self.proj = proj
        self._key: torch.Tensor | None = None
        self._value: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._key is not x:
            self._key, self._value = x, F.linear(x, self.proj)
        return self._value


@dataclass(frozen=True)
class Factored:
    """A student matrix applied as its two factors instead of their product (the clone's
    ``projection_path``): input side ``W_s = W_t @ P`` as ``(x @ P.T) @ W_t.T`` (the lift shared
    through ``lift``), output side ``W_s = P.T @ W_t`` (bias ``b_s = b_t @ P``) as
    ``(x @ W_t.T + b_t) @ P``: the bias given with it is the teacher's. :func:`linear` applies it;
    the result equals ``x @ W_s.T + b_s``."""

    teacher: torch.Tensor
    proj: torch.Tensor | None = None  # output side: P (D x d)
    lift: Lift | None = None  # input side

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.lift is not None:
            return F.linear(self.lift(x), self.teacher, bias)
        return F.linear(x, self.teacher, bias) @ self.proj


def linear(x: torch.Tensor, weight: "torch.Tensor | Factored", bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or a :class:`Factored` matrix applied factor by factor."""
    if isinstance(weight, Factored):
        return weight.apply(x, bias)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it: statistics in fp32, gain in the input dtype."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def position_ids_for(
    batch: int, length: int, device: torch.device, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions 0..T-1, or restarting at 0 at every new segment (document) when ``segment_ids`` is given."""
    pos = torch.arange(length, device=device).expand(batch, length)
    if segment_ids is None:
        return pos
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # index of the most recent segment start at or before each position
    last_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return pos - last_start


def attention_mask_for(
    attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None, length: int
) -> torch.Tensor | None:
    """Boolean (B, 1, T, T) mask, True = may attend; ``None`` for plain causal attention.

    Combines causality, key padding (``attention_mask`` 0 = pad) and, when ``segment_ids`` is
    given, a block-diagonal document mask.  Every query may attend to itself so fully padded rows
    stay finite (their outputs are ignored by the losses).
    """
    if attention_mask is None and segment_ids is None:
        return None
    device = (attention_mask if attention_mask is not None else segment_ids).device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = causal[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    eye = torch.eye(length, dtype=torch.bool, device=device)[None, None]
    return mask | eye


def attention(
    x: torch.Tensor,
    w: Weights,
    shape: AttentionShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    eps: float,
) -> dict[str, torch.Tensor]:
    """Self-attention on an already normalised input; returns q, k, v (projection outputs before
    the q/k norm and RoPE), ``attn`` (heads concatenated, before o_proj) and ``o`` (o_proj output)."""
    b, t, _ = x.shape
    q = linear(x, w["wq"], w.get("bq"))
    k = linear(x, w["wk"], w.get("bk"))
    v = linear(x, w["wv"], w.get("bv"))
    qh = q.view(b, t, shape.num_heads, shape.head_dim)
    kh = k.view(b, t, shape.num_kv_heads, shape.head_dim)
    if w.get("q_norm") is not None:
        qh = rms_norm(qh, w["q_norm"], eps)
        kh = rms_norm(kh, w["k_norm"], eps)
    qh, kh = apply_rotary_pos_emb(qh.transpose(1, 2), kh.transpose(1, 2), cos, sin)
    vh = v.view(b, t, shape.num_kv_heads, shape.head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qh,
        kh,
        vh,
        attn_mask=mask,
        is_causal=mask is None,
        scale=shape.scaling,
        enable_gqa=shape.num_heads != shape.num_kv_heads,
    )
    attn = out.transpose(1, 2).reshape(b, t, shape.num_heads * shape.head_dim)
    return {"q": q, "k": k, "v": v, "attn": attn, "o": linear(attn, w["wo"], w.get("bo"))}


def swiglu_mlp(x: torch.Tensor, w: Weights) -> dict[str, torch.Tensor]:
    """SwiGLU FFN on an already normalised input; returns gate, up (pre-activation), ffn_hidden
    (``silu(gate) * up``, the input of down_proj, width I) and down."""
    gate = linear(x, w["wgate"], w.get("bgate"))
    up = linear(x, w["wup"], w.get("bup"))
    hidden = F.silu(gate) * up
    down = linear(hidden, w["wdown"], w.get("bdown"))
    return {"gate": gate, "up": up, "ffn_hidden": hidden, "down": down}


def decoder_layer(
    x: torch.Tensor,
    w: Weights,
    shape: AttentionShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One pre-norm decoder layer. Returns the new residual stream and the layer's activations:
    q, k, v, attn, o (:func:`attention`), gate, up, ffn_hidden, down (:func:`swiglu_mlp`), and the
    normalised inputs of attention and FFN, ``attn_input`` and ``ffn_input`` (the stream's width).
    Every one of them is computed anyway; returning it only keeps it until the layer's clone
    terms are computed."""
    attn_input = rms_norm(x, w["attn_norm"], eps)
    acts = attention(attn_input, w, shape, cos, sin, mask, eps)
    acts["attn_input"] = attn_input
    x = x + acts["o"]
    ffn_input = rms_norm(x, w["mlp_norm"], eps)
    acts.update(swiglu_mlp(ffn_input, w))
    acts["ffn_input"] = ffn_input
    return x + acts["down"], acts
