"""``LowRankClone``: a frozen teacher and a trainable low-rank student running in lock-step."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lrc.losses import OUTPUT_ALIGNMENTS, TermRequest
from lrc.model.adapters import (
    TeacherArch,
    teacher_arch,
    teacher_io_weights,
    teacher_layer_weights,
    teacher_rotary,
)
from lrc.model.config import CloneConfig
from lrc.model.functional import AttentionShape, attention_mask_for, position_ids_for
from lrc.model.init import Calibration, get_projection_init, init_calibrator, init_requires_untied_head
from lrc.model.layers import CloneDecoderLayer, CloneEmbeddings, HeadInputs
from lrc.model.trainable import load_trainable_state, trainable_state


def _zero_init(param: torch.Tensor, ctx: Any) -> None:
    """Placeholder for a clone whose trainable tensors come from a checkpoint."""
    with torch.no_grad():
        param.zero_()


@dataclass
class CloneOutput:
    """What one clone forward returns.

    student_logits, teacher_logits: (B, T, V); ``None`` from a forward with ``logits=False``.
    clone_terms: ``{(teacher_layer, term): unweighted MSE}`` for the request's terms and layers.
    request: the :class:`~lrc.losses.TermRequest` the terms were computed for.
    student_layers: teacher indices of the layers the student keeps.
    token_mask: (B, T) bool of real (non-padding) tokens, or ``None`` when there is no padding.
    head: with ``logits=False``, the final hidden states and heads the logits come from
        (:class:`~lrc.model.layers.HeadInputs`), for a loss that computes them in chunks.
    """

    student_logits: torch.Tensor | None
    teacher_logits: torch.Tensor | None
    clone_terms: dict[tuple[int, str], torch.Tensor]
    request: TermRequest
    student_layers: list[int]
    token_mask: torch.Tensor | None = None
    head: HeadInputs | None = None


class LowRankClone(nn.Module):
    """Teacher + student of hidden size ``rank``; only projections and student gains train.

    Build it with :meth:`from_teacher`; everything needed to export the student (teacher config,
    clone config, tokenizer, generation config) is kept on the module, so :meth:`to_hf` and
    :meth:`save_student` need no argument repeated.
    """

    def __init__(
        self,
        arch: TeacherArch,
        teacher_config: Any,
        io_weights: dict[str, torch.Tensor | None],
        layer_weights: list[dict[str, torch.Tensor | None]],
        rotary: nn.Module,
        config: CloneConfig,
        tokenizer: Any = None,
        generation_config: Any = None,
        calibration: Calibration | None = None,
        restoring: bool = False,
        output_alignment: str = "free",
    ) -> None:
        super().__init__()
        config.validate_for(teacher_config)
        if output_alignment not in OUTPUT_ALIGNMENTS:
            raise ValueError(f"output_alignment must be one of {OUTPUT_ALIGNMENTS}, got {output_alignment!r}")
        self.output_alignment = output_alignment
        self.arch = arch
        self.config = config
        self.teacher_config = teacher_config
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.student_layers = config.kept_layers(arch.num_layers)
        self.student_eps = arch.rms_norm_eps if config.rms_norm_eps is None else config.rms_norm_eps
        tie = arch.tied_embeddings if config.tie_head_projection is None else config.tie_head_projection
        if config.tie_head_projection is None and init_requires_untied_head(config.init):
            tie = False  # e.g. "pca": the head's projection carries the final norm's gain
        data = {} if calibration is None else calibration.data

        init = _zero_init if restoring else get_projection_init(config.init)
        gen = torch.Generator().manual_seed(config.seed)
        shape = AttentionShape(arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.attn_scaling)
        param_dtype = config.torch_param_dtype()
        self.io = CloneEmbeddings(
            io_weights, config.rank, arch.rms_norm_eps, self.student_eps, tie, init, config.init_std, gen, param_dtype,
            calibration=data,
        )
        kept = set(self.student_layers)
        self.layers = nn.ModuleList(
            CloneDecoderLayer(
                i,
                w,
                shape,
                arch.rms_norm_eps,
                rank=config.rank if i in kept else None,
                attn_sharing=config.attn_sharing,
                ffn_sharing=config.ffn_sharing,
                student_eps=self.student_eps,
                init=init,
                init_std=config.init_std,
                generator=gen,
                param_dtype=param_dtype,
                calibration=data,
                projection_path=config.projection_path,
            )
            for i, w in enumerate(layer_weights)
        )
        if output_alignment == "learned":  # drawn after every projection, which stay as without them
            for layer in self.layers:
                if layer.is_student:
                    layer.add_output_alignment(config.init_std, gen, zero=restoring)
        self.rotary = rotary
        if calibration is not None:
            self._set_gains(calibration.gains)

    def _set_gains(self, gains: dict[str, float | torch.Tensor]) -> None:
        """Student RMSNorm gains from a calibration (names the student lacks are ignored)."""
        with torch.no_grad():
            for name, p in self.named_student_norms():
                if name in gains:
                    p.copy_(torch.as_tensor(gains[name], dtype=p.dtype).expand_as(p))

    @classmethod
    def from_teacher(
        cls,
        teacher: nn.Module,
        config: CloneConfig,
        tokenizer: Any = None,
        *,
        calibration_ids: torch.Tensor | None = None,
        restoring: bool = False,
        output_alignment: str = "free",
    ) -> "LowRankClone":
        """Clone a loaded transformers causal LM (Llama / Qwen2 / Qwen3). Its weights are shared,
        not copied, and frozen; ``tokenizer`` (optional) is saved beside exported students.

        ``calibration_ids`` (sequences x tokens of training data) feed a data-aware init such as
        ``init="pca"``, which requires them; inits that need no data ignore them.
        ``restoring=True``: the trainable tensors are about to be loaded from a checkpoint, so no
        init runs (projections start at zero, gains at one) and no calibration data is needed.
        ``output_alignment="learned"``: every kept layer also gets trainable alignment matrices for
        its attention and FFN outputs (``LossConfig.output_alignment``; training-only, never exported).
        """
        arch = teacher_arch(teacher)  # raises ValueError for unsupported teachers
        config.validate_for(teacher.config)
        calibrate = init_calibrator(config.init)
        if restoring:
            calibrate = None
        if calibrate is not None and calibration_ids is None:
            raise ValueError(
                f"CloneConfig.init={config.init!r} needs calibration data: pass calibration_ids=<(sequences, tokens) "
                "token ids of training data> to LowRankClone.from_teacher"
            )
        for p in teacher.parameters():
            p.requires_grad_(False)
        calibration = None
        if calibrate is not None:
            eps = arch.rms_norm_eps if config.rms_norm_eps is None else config.rms_norm_eps
            calibration = calibrate(teacher, calibration_ids, rank=config.rank, student_eps=eps)
        return cls(
            arch,
            copy.deepcopy(teacher.config),
            teacher_io_weights(teacher),
            [teacher_layer_weights(teacher, i) for i in range(arch.num_layers)],
            teacher_rotary(teacher),
            config,
            tokenizer=tokenizer,
            generation_config=copy.deepcopy(getattr(teacher, "generation_config", None)),
            calibration=calibration,
            restoring=restoring,
            output_alignment=output_alignment,
        )

    # ------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        terms: TermRequest | None = None,
        logits: bool = True,
    ) -> CloneOutput:
        """Run teacher and student on ``input_ids`` (B, T).

        attention_mask: (B, T), 0 = padding.  segment_ids: (B, T) document ids of packed
        sequences; when given, tokens attend only within their document and positions restart
        at every document.  terms: which clone terms to compute (default: all seven, every kept
        layer, attention output in teacher space, nothing detached); pass ``LRCLoss.request``.
        logits: ``False`` returns the final hidden states and
        heads (``out.head``) instead of the (B, T, V) logits, for ``LRCLoss`` with
        ``logit_chunk_size`` (pass ``logits=loss_fn.wants_logits``).
        """
        request = TermRequest() if terms is None else terms
        if request.output_alignment == "learned" and request.terms and self.output_alignment != "learned":
            raise ValueError(
                "the clone terms ask for learned output alignment but this clone has no alignment matrices: "
                "build it with output_alignment='learned'"
            )
        if request.layers is not None:
            missing = sorted(set(request.layers) - set(self.student_layers))
            if missing:
                raise ValueError(f"clone-term layers {missing} are not kept by the student {self.student_layers}")
        b, t = input_ids.shape
        position_ids = position_ids_for(b, t, input_ids.device, segment_ids)
        mask = attention_mask_for(attention_mask, segment_ids, t)
        token_mask = None if attention_mask is None else attention_mask.bool()

        x_s, x_t = self.io.embed(input_ids)
        cos, sin = self.rotary(x_t, position_ids)
        clone_terms: dict[tuple[int, str], torch.Tensor] = {}
        for layer in self.layers:
            x_s, x_t, layer_terms = layer(x_s, x_t, cos, sin, mask, request, token_mask)
            for name, value in layer_terms.items():
                clone_terms[(layer.index, name)] = value
        if not logits:
            return CloneOutput(None, None, clone_terms, request, list(self.student_layers), token_mask,
                               head=self.io.head_inputs(x_s, x_t))
        logits_s, logits_t = self.io.logits(x_s, x_t)
        return CloneOutput(logits_s, logits_t, clone_terms, request, list(self.student_layers), token_mask)

    # ------------------------------------------------------------------- trainable parameters
    def named_projections(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``embed``, ``head`` (only when not tied to ``embed``) and ``layers.{i}.{name}``; each D x d."""
        yield from self.io.named_projections()
        for layer in self.layers:
            yield from layer.named_projections()

    def named_student_norms(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Student RMSNorm gains: ``final_norm`` and ``layers.{i}.{attn,mlp}_norm``."""
        yield "final_norm", self.io.student_final_norm
        for layer in self.layers:
            for name, p in layer.norms.items():
                yield f"layers.{layer.index}.{name}_norm", p

    def named_alignments(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``layers.{i}.align_{o,down}`` (D x d each) with ``output_alignment="learned"``; none otherwise."""
        for layer in self.layers:
            yield from layer.named_alignments()

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every trainable tensor under a stable name (projections, gains, then any alignment matrices)."""
        yield from self.named_projections()
        yield from self.named_student_norms()
        yield from self.named_alignments()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes (no teacher weight): for small checkpoints."""
        return trainable_state(self.named_trainable())

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.named_trainable(), state)

    # ------------------------------------------------------------------------------- export
    def to_hf(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain transformers causal LM with every product merged (see :mod:`lrc.model.export`)."""
        from lrc.model.export import build_student

        return build_student(self, dtype=dtype)

    def save_student(self, path: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write the merged student (+ tokenizer, generation config) atomically to ``path``."""
        from lrc.model.export import save_student

        return save_student(self, path, dtype=dtype, overwrite=overwrite)
