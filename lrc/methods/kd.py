"""Vanilla knowledge distillation (docs/method.md, section 8): a randomly initialised plain student of the
LRC export's shape, trained with CE + KL against the frozen teacher.

    model = KDModel.from_teacher(teacher, rank=288, tokenizer=tok)
    out = model(input_ids)                                   # out.student_logits, out.teacher_logits
    terms = kd_loss(out.student_logits, out.teacher_logits, input_ids, token_mask=out.token_mask)
    terms["loss"].backward()                                 # "loss", "ce", "kl"
    model.save_student("my-student")

:class:`KDModule` is ``method=kd`` of lrc-distill: this model and loss in the shared training loop.
"""

from __future__ import annotations

import copy
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from lrc.losses import KL_REDUCTIONS, chunked_ce_kl
from lrc.methods.students import kept_teacher_layers, random_student, save_plain_student
from lrc.model import CloneConfig
from lrc.model.adapters import check_teacher, teacher_arch
from lrc.model.functional import attention_mask_for, position_ids_for
from lrc.model.trainable import load_trainable_state, trainable_state
from lrc.training.module import DistillModule


def check_kd_weights(w_ce: float, w_kl: float, temperature: float, kl_reduction: str) -> None:
    """``ValueError`` naming the key for a negative weight, a non-positive temperature or an
    unknown KL reduction."""
    for key, value in (("w_ce", w_ce), ("w_kl", w_kl)):
        if not float(value) >= 0:
            raise ValueError(f"{key} must be >= 0, got {value!r}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    *,
    w_ce: float = 1.0,
    w_kl: float = 1.0,
    temperature: float = 40.0,
    kl_reduction: str = "sequence_sum",
    kl_tau_squared: bool = False,
) -> dict[str, torch.Tensor]:
    """``{"loss": w_ce * ce + w_kl * kl, "ce", "kl"}`` with the LRC objective's CE and KL
    (:func:`~lrc.losses.chunked_ce_kl` over every position at once: the values and gradient of
    :func:`~lrc.losses.next_token_cross_entropy` and :func:`~lrc.losses.kl_divergence`; ``ce``
    and ``kl`` are detached, ``loss`` carries the gradient).

    labels default to ``input_ids`` with positions outside ``token_mask`` ignored (-100), as in
    :class:`~lrc.losses.LRCLoss`; ``token_mask`` (B, T) also excludes padding from the KL.
    """
    check_kd_weights(w_ce, w_kl, temperature, kl_reduction)
    if labels is None:
        labels = input_ids if token_mask is None else input_ids.masked_fill(~token_mask.bool(), -100)
    loss, ce, kl = chunked_ce_kl(
        student_logits, teacher_logits, labels, chunk_size=labels.numel(), w_ce=w_ce, w_kl=w_kl,
        temperature=temperature, reduction=kl_reduction, tau_squared=kl_tau_squared, token_mask=token_mask,
    )
    return {"loss": loss, "ce": ce, "kl": kl}


@dataclass
class DistillOutput:
    """What a baseline forward returns; the fields a validation step reads are those of
    :class:`~lrc.model.CloneOutput`.

    student_logits, teacher_logits: (B, T, V). token_mask: (B, T) bool of real tokens, or ``None``
    when there is no padding. student_layers: teacher indices of the layers the student keeps.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    token_mask: torch.Tensor | None = None
    student_layers: list[int] = field(default_factory=list)


def hf_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    additive_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Keyword arguments for a transformers causal LM that reproduce the clone's masking: positions
    restart at each document of ``segment_ids``, and a (B, 1, T, T) mask (causal, key padding,
    document blocks, self always allowed; ``None`` for plain causal attention). The mask is boolean
    (True = attend), or additive (0 / dtype minimum) in ``additive_dtype`` for eager attention."""
    b, t = input_ids.shape
    mask = attention_mask_for(attention_mask, segment_ids, t)
    if mask is not None and additive_dtype is not None:
        blocked = torch.finfo(additive_dtype).min
        mask = torch.zeros(mask.shape, dtype=additive_dtype, device=mask.device).masked_fill(~mask, blocked)
    return {
        "position_ids": position_ids_for(b, t, input_ids.device, segment_ids),
        "attention_mask": mask,
        "use_cache": False,
    }


def run_causal_lm(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, T, V) of a transformers causal LM under :func:`hf_inputs`' masking."""
    eager = model.config._attn_implementation == "eager"
    additive = next(model.parameters()).dtype if eager else None
    return model(input_ids, **hf_inputs(input_ids, attention_mask, segment_ids, additive)).logits


class KDModel(nn.Module):
    """A frozen teacher and a trainable plain student (a transformers causal LM).

    The teacher is a registered submodule with ``requires_grad=False``, kept in eval mode and run
    under ``no_grad``; every trainable tensor belongs to the student (see :meth:`named_trainable`).
    Student layer j corresponds to teacher layer ``student_layers[j]``.
    """

    method = "kd"

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        student_layers: Sequence[int] | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        check_teacher(teacher)
        self.student_layers = kept_teacher_layers(student_layers, teacher.config.num_hidden_layers)
        if len(self.student_layers) != student.config.num_hidden_layers:
            raise ValueError(
                f"student has {student.config.num_hidden_layers} layers but student_layers names "
                f"{len(self.student_layers)}: {self.student_layers}"
            )
        teacher.requires_grad_(False)
        self.teacher = teacher.eval()
        self.student = student
        self.tokenizer = tokenizer
        if getattr(teacher, "generation_config", None) is not None:
            student.generation_config = copy.deepcopy(teacher.generation_config)

    @classmethod
    def from_teacher(
        cls,
        teacher: nn.Module,
        rank: int,
        kept_layers: Sequence[int] | None = None,
        *,
        seed: int = 0,
        init_std: float | None = None,
        rms_norm_eps: float | None = None,
        tie_word_embeddings: bool | None = None,
        dtype: torch.dtype = torch.float32,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> "KDModel":
        """A fresh :func:`~lrc.methods.students.random_student` (on the teacher's device) for
        ``teacher``; ``kwargs`` go to the constructor."""
        check_teacher(teacher)
        student = random_student(
            teacher.config, rank, kept_layers, seed=seed, init_std=init_std, rms_norm_eps=rms_norm_eps,
            tie_word_embeddings=tie_word_embeddings, dtype=dtype,
        ).to(next(teacher.parameters()).device)
        return cls(teacher, student, student_layers=kept_layers, tokenizer=tokenizer, **kwargs)

    def train(self, mode: bool = True) -> "KDModel":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
    ) -> DistillOutput:
        """Teacher and student logits for ``input_ids`` (B, T); ``attention_mask`` (0 = padding) and
        ``segment_ids`` (documents of packed sequences) as in :meth:`LowRankClone.forward`."""
        with torch.no_grad():
            teacher_logits = run_causal_lm(self.teacher, input_ids, attention_mask, segment_ids)
        student_logits = run_causal_lm(self.student, input_ids, attention_mask, segment_ids)
        token_mask = None if attention_mask is None else attention_mask.bool()
        return DistillOutput(student_logits, teacher_logits, token_mask, list(self.student_layers))

    # ------------------------------------------------------------------- trainable parameters
    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every trainable tensor (student weights, plus any method-specific ones) by module path."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.named_trainable())

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.named_trainable(), state)

    # ------------------------------------------------------------------------------- export
    def to_hf(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A copy of the plain student, in eval mode (cast to ``dtype`` if given)."""
        student = copy.deepcopy(self.student)
        return (student if dtype is None else student.to(dtype)).eval()

    def save_student(self, path: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write the plain student, tokenizer, generation config and ``lrc_student.json`` atomically."""
        meta = {
            "method": self.method,
            "teacher": getattr(self.teacher.config, "_name_or_path", None),
            "teacher_model_type": self.teacher.config.model_type,
            "student_layers": self.student_layers,
            "rank": self.student.config.hidden_size,
        }
        return save_plain_student(
            self.student, path, tokenizer=self.tokenizer, metadata=meta, dtype=dtype, overwrite=overwrite
        )


# ----------------------------------------------------------------------------- method=kd
@dataclass
class KDLossConfig:
    """The ``loss`` settings of ``method=kd`` (:func:`kd_loss`): ``w_ce``, ``w_kl``, ``temperature``,
    ``kl_reduction`` and ``kl_tau_squared``, with the LRC objective's meaning and defaults."""

    w_ce: float = 1.0
    w_kl: float = 1.0
    temperature: float = 40.0
    kl_reduction: str = "sequence_sum"
    kl_tau_squared: bool = False

    def __post_init__(self) -> None:
        check_kd_weights(self.w_ce, self.w_kl, self.temperature, self.kl_reduction)


#: ``student`` keys only the low-rank clone reads (``extra``: provenance its export writes); a
#: baseline refuses any value but CloneConfig's default.
LRC_ONLY_STUDENT_KEYS = ("attn_sharing", "ffn_sharing", "init", "init_calibration_sequences", "projection_path", "extra")


def plain_student_settings(student: Mapping[str, Any], teacher: nn.Module) -> dict[str, Any]:
    """:meth:`KDModel.from_teacher` keyword arguments for the ``student`` settings: the shape the LRC
    export has for them (``rank``; ``layers`` / ``layer_stride``; ``rms_norm_eps``; an embedding tied
    to the head exactly when the teacher ties its own and ``tie_head_projection`` is not false) and a
    normal init of ``init_std`` seeded by ``seed``, in ``param_dtype``."""
    config = CloneConfig(**student)
    arch = teacher_arch(teacher)
    return {
        "rank": config.rank,
        "kept_layers": config.kept_layers(arch.num_layers),
        "seed": config.seed,
        "init_std": config.init_std,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": arch.tied_embeddings and config.tie_head_projection is not False,
        "dtype": config.torch_param_dtype() or next(teacher.parameters()).dtype,
    }


class KDModule(DistillModule):
    """``method=kd``: a randomly initialised plain student of the LRC export's shape, trained with
    CE + KL (:func:`kd_loss`). ``student`` takes :class:`~lrc.model.CloneConfig`'s keys; those only the
    clone reads (:data:`LRC_ONLY_STUDENT_KEYS`) must keep their defaults. Every student matrix is
    decayed by ``optim.weight_decay``; norm gains and biases are not."""

    default_name = "kd"
    loss_config: type = KDLossConfig
    model_class: type[KDModel] = KDModel
    param_group_names = ("weights", "norms_and_biases")

    @classmethod
    def check_settings(cls, teacher_config: Any, student: Mapping[str, Any], loss: Mapping[str, Any]) -> None:
        config = CloneConfig(**student)
        for key in LRC_ONLY_STUDENT_KEYS:
            spec = next(f for f in fields(CloneConfig) if f.name == key)
            default = spec.default if spec.default is not MISSING else spec.default_factory()
            if getattr(config, key) != default:
                raise ValueError(
                    f"student.{key}={getattr(config, key)!r} is a low-rank clone setting that "
                    f"method={cls.default_name} does not use; leave it at {default!r}"
                )
        config.validate_for(teacher_config)  # rank, kept layers: the same student the LRC export has
        cls.loss_config(**loss)

    def model_options(self) -> dict[str, Any]:
        """Keyword arguments of :attr:`model_class`'s constructor beyond the student's shape."""
        return {}

    def build_model(self, teacher: nn.Module, tokenizer: Any, restoring: bool) -> KDModel:
        self.check_settings(teacher.config, self.student_cfg, asdict(self.loss_settings))
        settings = plain_student_settings(self.student_cfg, teacher)
        return self.model_class.from_teacher(teacher, tokenizer=tokenizer, **settings, **self.model_options())

    def loss_terms(self, out: DistillOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return kd_loss(out.student_logits, out.teacher_logits, batch["input_ids"], batch.get("labels"),
                       out.token_mask, **asdict(self.loss_settings))

    def deployed_config(self) -> Any:
        return self.model.student.config
