"""Clone modules: one per teacher decoder layer, plus one for embedding / final norm / LM head.

Each module owns its teacher tensors as frozen ``nn.Parameter``s (sharing storage with the loaded
teacher, so no copy) next to its trainable projections and student RMSNorm gains.  That keeps
every layer self-contained, so it can be wrapped on its own by FSDP2 or by activation
checkpointing.

Orientation (docs/method.md, section 2):  input side ``W_s = W_t @ P``; output side ``W_s = P.T @ W_t``
(bias ``b_s = b_t @ P``); embedding ``E_s = E @ P_embed``; head ``H_s = H @ P_head``.
"""

from __future__ import annotations

from collections import abc
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lrc.losses import TermRequest, layer_clone_terms, teacher_activations_read
from lrc.model.functional import AttentionShape, Factored, Lift, decoder_layer, rms_norm
from lrc.model.init import InitContext, ProjectionInit

# projection name -> (teacher matrices it multiplies, side)
_ATTN_PROJ = {"all": {"q": ("wq",), "k": ("wk",), "v": ("wv",)}, "io": {"qkv": ("wq", "wk", "wv")}}
_FFN_PROJ = {"all": {"gate": ("wgate",), "up": ("wup",)}, "io": {"gate_up": ("wgate", "wup")}}
_OUTPUT_PROJ = {"o": ("wo", "bo"), "down": ("wdown", "bdown")}


#: how a training forward applies each projected matrix: "materialise" the product W_t @ P (or
#: P.T @ W_t) once per forward, apply the two "factored" matrices to the activations, or let the
#: cost model (:func:`projection_path_flops`) choose per projection ("auto")
PROJECTION_PATHS = ("auto", "materialise", "factored")


def projection_path_flops(
    tokens: int, inner: Sequence[int], teacher_dim: int, rank: int, backward: bool = True
) -> dict[str, int]:
    """FLOPs (a multiply-add = 2) of the student matrices that share one projection ``P`` (D x d)
    over ``tokens`` positions, for each path: forward, plus with ``backward`` the gradients of the
    activations and of ``P`` (the teacher matrices are frozen). ``inner`` are the matrices' widths
    on the head / FFN side (input side: W_t is inner x D; output side: W_t is D x inner).

    With ``s = sum(inner)``, ``n`` tokens, forward + backward:

    - materialise: the product ``2Dds``, applying it ``2nds``; backward: the activation and
      product gradients ``2nds + 2nds``, the gradient of P through the product ``2Dds``:
      ``4Dds + 6nds``;
    - factored: ``x @ P.T`` (or ``y @ P``) ``2ndD`` once for the group and the teacher matrices
      ``2nDs``; backward: ``2nDs`` through the teacher matrices, ``2ndD`` each for the activation's
      and P's gradients: ``6ndD + 4nDs``.

    Forward only: ``2Dds + 2nds`` against ``2ndD + 2nDs``.
    """
    n, big, d, s = int(tokens), int(teacher_dim), int(rank), sum(int(o) for o in inner)
    if backward:
        return {"materialise": 4 * big * d * s + 6 * n * d * s, "factored": 6 * n * d * big + 4 * n * big * s}
    return {"materialise": 2 * big * d * s + 2 * n * d * s, "factored": 2 * n * d * big + 2 * n * big * s}


def choose_projection_path(
    setting: str, tokens: int, inner: Sequence[int], teacher_dim: int, rank: int, backward: bool = True
) -> str:
    """``setting`` itself, or for "auto" the path of fewer FLOPs (:func:`projection_path_flops`;
    a tie materialises)."""
    if setting not in PROJECTION_PATHS:
        raise ValueError(f"projection_path must be one of {PROJECTION_PATHS}, got {setting!r}")
    if setting != "auto":
        return setting
    cost = projection_path_flops(tokens, inner, teacher_dim, rank, backward)
    return "factored" if cost["factored"] < cost["materialise"] else "materialise"


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


class _ComputeView(abc.Mapping):
    """Read-only view of the projections, each cast to the compute dtype when it is read."""

    def __init__(self, proj: nn.ParameterDict, compute) -> None:
        self._proj, self._compute = proj, compute

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._compute(self._proj[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._proj.keys())

    def __len__(self) -> int:
        return len(self._proj)


class CloneDecoderLayer(nn.Module):
    """Teacher layer ``index`` (frozen) and, if the student keeps it, its projections and gains.

    ``forward(x_s, x_t, ...)`` advances both streams through this layer and returns the clone
    terms it was asked for.  A layer the student skips leaves the student stream unchanged.
    """

    def __init__(
        self,
        index: int,
        teacher: Mapping[str, torch.Tensor | None],
        shape: AttentionShape,
        teacher_eps: float,
        *,
        rank: int | None,
        attn_sharing: str = "all",
        ffn_sharing: str = "all",
        student_eps: float | None = None,
        init: ProjectionInit | None = None,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
        param_dtype: torch.dtype | None = None,
        calibration: Mapping | None = None,
        projection_path: str = "auto",
    ) -> None:
        super().__init__()
        if projection_path not in PROJECTION_PATHS:
            raise ValueError(f"projection_path must be one of {PROJECTION_PATHS}, got {projection_path!r}")
        self.projection_path = projection_path
        #: recompute the student stream (and its clone terms) in backward instead of keeping its
        #: activations; the teacher stream runs once and keeps only what the terms read
        #: (``activation_checkpointing: student``, :mod:`lrc.model.checkpointing`)
        self.recompute_student = False
        self.index = index
        self.shape = shape
        self.teacher_eps = teacher_eps
        self.student_eps = teacher_eps if student_eps is None else student_eps
        self.teacher = nn.ParameterDict({k: _frozen(v) for k, v in teacher.items() if v is not None})
        self.is_student = rank is not None
        self.attn_sharing, self.ffn_sharing = attn_sharing, ffn_sharing
        self.proj = nn.ParameterDict()
        self.norms = nn.ParameterDict()
        self.align = nn.ParameterDict()  # training-only output aligners (add_output_alignment)
        if rank is None:
            return
        d_t = teacher["wq"].shape[1]
        ref = teacher["wq"]
        dtype = param_dtype or ref.dtype
        calibration = calibration or {}
        inputs = [(name, keys, "attn_norm") for name, keys in _ATTN_PROJ[attn_sharing].items()]
        inputs += [(name, keys, "mlp_norm") for name, keys in _FFN_PROJ[ffn_sharing].items()]
        for name, keys, norm in inputs:
            self.proj[name] = self._new_projection(
                name, "input", keys, (d_t, rank), dtype, init, init_std, generator, teacher[norm], calibration
            )
        for name, keys in _OUTPUT_PROJ.items():
            self.proj[name] = self._new_projection(
                name, "output", keys, (d_t, rank), dtype, init, init_std, generator, None, calibration
            )
        for name in ("attn", "mlp"):
            self.norms[name] = nn.Parameter(torch.ones(rank, dtype=dtype, device=ref.device))

    def _new_projection(
        self, name, side, keys, shape, dtype, init, init_std, generator, norm_gain, calibration
    ) -> nn.Parameter:
        p = nn.Parameter(torch.empty(shape, dtype=dtype, device=self.teacher["wq"].device))
        if init is not None:
            ctx = InitContext(
                name=f"layers.{self.index}.{name}",
                side=side,
                teacher_weights={k: self.teacher[k] for k in keys if k in self.teacher},
                generator=generator,
                std=init_std,
                norm_gain=norm_gain,
                calibration=calibration,
            )
            init(p, ctx)
        return p

    def add_output_alignment(self, std: float, generator: torch.Generator | None, zero: bool = False) -> None:
        """Trainable alignment matrices for ``output_alignment="learned"`` (the paper's "without
        alignment-free" ablation): ``align["o"]`` and ``align["down"]``, each D x d, mapping the
        student's attention / FFN output to the teacher's width, N(0, ``std``) like the reference
        code's extra aligners (zeros with ``zero``: a checkpoint fills them). Training-only: the
        merged student (:meth:`student_weights`) never uses them."""
        ref = self.proj["o"]
        for name in ("o", "down"):
            a = torch.zeros(ref.shape, dtype=ref.dtype)
            if not zero:
                a.normal_(0.0, std, generator=generator)
            self.align[name] = nn.Parameter(a.to(ref.device))

    def named_alignments(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.align.items():
            yield f"layers.{self.index}.align_{name}", p

    # ---------------------------------------------------------------------------------------
    def projection_for(self, key: str) -> torch.Tensor:
        """The projection that multiplies teacher tensor ``key`` (e.g. "wq" -> Pq or Pqkv)."""
        for name, keys in {**_ATTN_PROJ[self.attn_sharing], **_FFN_PROJ[self.ffn_sharing], **_OUTPUT_PROJ}.items():
            if key in keys:
                return self.proj[name]
        raise KeyError(key)

    def named_projections(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.proj.items():
            yield f"layers.{self.index}.{name}", p

    def teacher_weights(self) -> dict[str, torch.Tensor]:
        return dict(self.teacher.items())

    def compute(self, p: torch.Tensor) -> torch.Tensor:
        """A trainable tensor in the teacher's dtype (fp32 master weights, bf16 compute)."""
        return p.to(self.teacher["wq"].dtype)

    def student_weights(self) -> dict[str, torch.Tensor]:
        """Merged student tensors, computed once per call (once per forward)."""
        return self.student_weights_except(set())

    def student_weights_except(self, skip: set[str]) -> dict[str, torch.Tensor]:
        """:meth:`student_weights` without the products of the projections named in ``skip``."""
        t, c = self.teacher, self.compute
        w: dict[str, torch.Tensor] = {"attn_norm": c(self.norms["attn"]), "mlp_norm": c(self.norms["mlp"])}
        for name, (side, keys) in self.projection_groups().items():
            if side == "input" and name not in skip:
                p = c(self.proj[name])
                for key in keys:
                    w[key] = t[key] @ p
        for key in ("bq", "bk", "bv", "bgate", "bup", "q_norm", "k_norm"):
            if key in t:
                w[key] = t[key]
        for name, (wkey, bkey) in _OUTPUT_PROJ.items():
            if name in skip:
                continue
            p = c(self.proj[name])
            w[wkey] = p.t() @ t[wkey]
            if bkey in t:
                w[bkey] = t[bkey] @ p
        return w

    def projection_groups(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Projection name -> (side, the teacher matrices it multiplies), e.g. "q" -> ("input", ("wq",))."""
        groups = {name: ("input", keys) for name, keys in
                  {**_ATTN_PROJ[self.attn_sharing], **_FFN_PROJ[self.ffn_sharing]}.items()}
        groups.update({name: ("output", keys[:1]) for name, keys in _OUTPUT_PROJ.items()})
        return groups

    def projection_paths(self, tokens: int, backward: bool = True) -> dict[str, str]:
        """The path each projection takes in a forward over ``tokens`` positions
        (:func:`choose_projection_path` with this layer's ``projection_path``)."""
        t = self.teacher
        paths = {}
        for name, (side, keys) in self.projection_groups().items():
            inner = [t[k].shape[0] if side == "input" else t[k].shape[1] for k in keys]
            d_t, rank = self.proj[name].shape
            paths[name] = choose_projection_path(self.projection_path, tokens, inner, d_t, rank, backward)
        return paths

    def forward_weights(self, tokens: int, backward: bool = True) -> dict[str, torch.Tensor | Factored]:
        """The student's tensors for one forward over ``tokens`` positions: :meth:`student_weights`,
        except that the matrices of a projection whose path (:meth:`projection_paths`) is "factored"
        are :class:`~lrc.model.functional.Factored` (applied factor by factor, with the teacher's
        bias for output-side ones). Both give the same layer output."""
        paths = self.projection_paths(tokens, backward)
        if all(p == "materialise" for p in paths.values()):
            return self.student_weights()
        t, c = self.teacher, self.compute
        w = self.student_weights_except({n for n, p in paths.items() if p == "factored"})
        for name, (side, keys) in self.projection_groups().items():
            if paths[name] != "factored":
                continue
            p = c(self.proj[name])
            if side == "input":
                lift = Lift(p)
                for key in keys:
                    w[key] = Factored(t[key], lift=lift)
            else:
                wkey, bkey = _OUTPUT_PROJ[name]
                w[wkey] = Factored(t[wkey], proj=p)
                if bkey in t:
                    w[bkey] = t[bkey]
        return w

    def forward(
        self,
        x_s: torch.Tensor,
        x_t: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        request: TermRequest,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            x_t, acts_t = decoder_layer(x_t, self.teacher, self.shape, cos, sin, mask, self.teacher_eps)
        if not self.is_student:
            return x_s, x_t, {}
        wanted = teacher_activations_read(request.terms) if request.wants(self.index) else ()
        targets = {k: acts_t[k] for k in wanted}
        del acts_t  # what no term reads is freed now
        if self.recompute_student and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            x_s, terms = checkpoint(self._student_forward, x_s, targets, cos, sin, mask, request, token_mask,
                                    use_reentrant=False)
        else:
            x_s, terms = self._student_forward(x_s, targets, cos, sin, mask, request, token_mask)
        return x_s, x_t, terms

    def _student_forward(
        self,
        x_s: torch.Tensor,
        targets: Mapping[str, torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        request: TermRequest,
        token_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student stream through this layer and its clone terms against the teacher's
        activations ``targets`` (the ones the terms read)."""
        backward = torch.is_grad_enabled() and any(p.requires_grad for p in self.proj.values())
        weights = self.forward_weights(x_s.shape[0] * x_s.shape[1], backward)
        x_s, acts_s = decoder_layer(x_s, weights, self.shape, cos, sin, mask, self.student_eps)
        terms: dict[str, torch.Tensor] = {}
        if request.wants(self.index):
            terms = layer_clone_terms(
                acts_s,
                targets,
                request,
                teacher_weights=self.teacher,
                projections=_ComputeView(self.proj, self.compute),
                token_mask=token_mask,
                layer=self.index,
                alignments=_ComputeView(self.align, self.compute),
            )
        return x_s, terms


@dataclass
class HeadInputs:
    """What turns into logits, for a loss that computes them in chunks of positions
    (``LossConfig.logit_chunk_size``): the final-normed hidden states of both streams (B, T, d) and
    (B, T, D) and their heads (V, d) and (V, D), so ``student_logits = student_hidden @ student_head.T``.
    The teacher's are computed without gradient."""

    student_hidden: torch.Tensor
    student_head: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_head: torch.Tensor


class CloneEmbeddings(nn.Module):
    """Token embedding, final RMSNorm and LM head of both streams.

    The student embeds as ``E[ids] @ P_embed`` (identical to ``(E @ P_embed)[ids]`` but without
    materialising the V x d matrix) and predicts with the merged head ``H @ P_head``.
    """

    def __init__(
        self,
        teacher: Mapping[str, torch.Tensor | None],
        rank: int,
        teacher_eps: float,
        student_eps: float,
        tie_head_projection: bool,
        init: ProjectionInit,
        init_std: float,
        generator: torch.Generator | None,
        param_dtype: torch.dtype | None = None,
        calibration: Mapping | None = None,
    ) -> None:
        super().__init__()
        embed = teacher["embed"]
        dtype = param_dtype or embed.dtype
        self.teacher_eps, self.student_eps = teacher_eps, student_eps
        self.teacher_embed = _frozen(embed)
        self.teacher_head = _frozen(teacher["head"])  # None when the teacher ties its head
        self.teacher_final_norm = _frozen(teacher["final_norm"])
        self.student_final_norm = nn.Parameter(torch.ones(rank, dtype=dtype, device=embed.device))
        d_t = embed.shape[1]

        def new(name: str, weights: dict[str, torch.Tensor], norm_gain: torch.Tensor | None) -> nn.Parameter:
            p = nn.Parameter(torch.empty(d_t, rank, dtype=dtype, device=embed.device))
            ctx = InitContext(
                name=name, side="embedding", teacher_weights=weights, generator=generator, std=init_std,
                norm_gain=norm_gain, calibration=calibration or {},
            )
            init(p, ctx)
            return p

        self.proj_embed = new("embed", {"embed": embed}, None)
        head_weights = {"head": embed if teacher["head"] is None else teacher["head"]}
        self.proj_head = None if tie_head_projection else new("head", head_weights, teacher["final_norm"])

    @property
    def head_weight(self) -> torch.Tensor:
        return self.teacher_embed if self.teacher_head is None else self.teacher_head

    @property
    def head_projection(self) -> torch.Tensor:
        return self.proj_embed if self.proj_head is None else self.proj_head

    @property
    def student_tied(self) -> bool:
        """The student's embedding and head are one matrix (teacher tied and projection tied)."""
        return self.teacher_head is None and self.proj_head is None

    def named_projections(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "embed", self.proj_embed
        if self.proj_head is not None:
            yield "head", self.proj_head

    def compute(self, p: torch.Tensor) -> torch.Tensor:
        """A trainable tensor in the teacher's dtype (fp32 master weights, bf16 compute)."""
        return p.to(self.teacher_embed.dtype)

    def merged(self) -> dict[str, torch.Tensor]:
        """Student embedding (V x d), head (V x d) and final norm gain (d,)."""
        c = self.compute
        embed = self.teacher_embed @ c(self.proj_embed)
        head = embed if self.student_tied else self.head_weight @ c(self.head_projection)
        return {"embed": embed, "head": head, "final_norm": c(self.student_final_norm)}

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x_t = F.embedding(input_ids, self.teacher_embed)
        x_s = F.embedding(input_ids, self.teacher_embed) @ self.compute(self.proj_embed)
        return x_s, x_t

    def head_inputs(self, x_s: torch.Tensor, x_t: torch.Tensor) -> HeadInputs:
        """The final norms of both streams and the two heads (the student's merged, ``H @ P_head``)."""
        c = self.compute
        with torch.no_grad():
            h_t = rms_norm(x_t, self.teacher_final_norm, self.teacher_eps)
        head_s = self.head_weight @ c(self.head_projection)
        h_s = rms_norm(x_s, c(self.student_final_norm), self.student_eps)
        return HeadInputs(h_s, head_s, h_t, self.head_weight)

    def logits(self, x_s: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.head_inputs(x_s, x_t)
        with torch.no_grad():
            logits_t = F.linear(h.teacher_hidden, h.teacher_head)
        return F.linear(h.student_hidden, h.student_head), logits_t

