"""TinyBERT-style distillation (docs/method.md, section 8): the randomly initialised plain student of
:mod:`lrc.methods.kd`, trained with

    loss = w_ce * CE + w_kl * KL + w_hidden * sum_j MSE(h_s[j] @ W_j^T, h_t[j]) + w_attn * sum_j MSE(A_s[j], A_t[j])

- hidden states: ``h[0]`` is the embedding output, ``h[j + 1]`` the output of student layer j and
  of teacher layer ``student_layers[j]`` (before the final norm); ``W_j`` is a learned D x d map
  (one per entry, or one shared by all with ``shared_map=True`` as in the TinyBERT code);
- attention: the softmax probability maps (B, H, T, T) of student layer j and teacher layer
  ``student_layers[j]``; both have the teacher's H query heads (GQA key/value heads are repeated
  per query head, as transformers' eager attention does).

Both models run with transformers' eager attention (the only implementation that returns
probabilities); the maps train with the student but are not exported.

:class:`TinyBERTModule` is ``method=tinybert`` of lrc-distill: this model and loss in the shared loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lrc.losses import masked_mse
from lrc.methods.kd import DistillOutput, KDLossConfig, KDModel, KDModule, kd_loss, run_causal_lm


@dataclass
class TinyBERTOutput(DistillOutput):
    """:class:`~lrc.methods.kd.DistillOutput` plus the features of the TinyBERT terms (empty lists
    when the forward ran with ``features=False``).

    student_hidden: [embedding output, output of student layer 0, ...], each (B, T, d).
    teacher_hidden: [embedding output, output of teacher layer student_layers[0], ...], (B, T, D).
    hidden_maps: the (D, d) map weight for each entry of ``student_hidden``.
    student_attn / teacher_attn: per student layer, attention probabilities (B, H, T, T).
    """

    student_hidden: list[torch.Tensor] = field(default_factory=list)
    teacher_hidden: list[torch.Tensor] = field(default_factory=list)
    hidden_maps: list[torch.Tensor] = field(default_factory=list)
    student_attn: list[torch.Tensor] = field(default_factory=list)
    teacher_attn: list[torch.Tensor] = field(default_factory=list)


def hidden_mse_terms(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    maps: Sequence[torch.Tensor],
    token_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per entry j: mean squared error of ``student_hidden[j] @ maps[j].T`` against
    ``teacher_hidden[j]`` over all (valid-token) elements."""
    if not len(student_hidden) == len(teacher_hidden) == len(maps):
        counts = (len(student_hidden), len(teacher_hidden), len(maps))
        raise ValueError("%d student, %d teacher hidden states and %d maps: the counts must agree" % counts)
    terms = []
    for h_s, h_t, w in zip(student_hidden, teacher_hidden, maps):
        mapped = F.linear(h_s, w.to(h_s.dtype))
        terms.append(masked_mse(mapped, h_t.to(mapped.dtype), token_mask))
    return terms


def attention_mse_terms(
    student_attn: Sequence[torch.Tensor],
    teacher_attn: Sequence[torch.Tensor],
    token_mask: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Per layer: mean squared error of the (B, H, T, T) probability maps over all elements whose
    query is a valid token of ``token_mask`` (B, T)."""
    if len(student_attn) != len(teacher_attn):
        raise ValueError(f"{len(student_attn)} student attention maps vs {len(teacher_attn)} teacher maps")
    return [
        masked_mse(a_s.transpose(1, 2), a_t.to(a_s.dtype).transpose(1, 2), token_mask)
        for a_s, a_t in zip(student_attn, teacher_attn)
    ]


def tinybert_loss(
    out: TinyBERTOutput,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    w_hidden: float = 1.0,
    w_attn: float = 1.0,
    **kd_settings: Any,
) -> dict[str, torch.Tensor]:
    """:func:`~lrc.methods.kd.kd_loss` (``kd_settings``: its ``w_ce``, ``w_kl``, ``temperature``,
    ``kl_reduction``, ``kl_tau_squared``) plus ``hidden`` and ``attn`` (sums over entries of the
    unweighted MSEs); ``loss`` adds ``w_hidden * hidden + w_attn * attn``. Per-entry values are
    ``tinybert/hidden/embed``, ``tinybert/hidden/{teacher layer}`` and ``tinybert/attn/{teacher layer}``.
    A term whose weight is 0 is reported as 0 and not computed."""
    for key, value in (("w_hidden", w_hidden), ("w_attn", w_attn)):
        if not float(value) >= 0:
            raise ValueError(f"{key} must be >= 0, got {value!r}")
    results = kd_loss(out.student_logits, out.teacher_logits, input_ids, labels, out.token_mask, **kd_settings)
    zero = results["ce"].new_zeros(())
    hidden = attn = zero
    if w_hidden > 0 or w_attn > 0:
        if not out.student_hidden:
            raise ValueError("the TinyBERT terms need a forward with features=True")
    if w_hidden > 0:
        names = ["embed", *out.student_layers]
        per = hidden_mse_terms(out.student_hidden, out.teacher_hidden, out.hidden_maps, out.token_mask)
        results.update({f"tinybert/hidden/{n}": v for n, v in zip(names, per)})
        hidden = torch.stack(per).sum()
    if w_attn > 0:
        per = attention_mse_terms(out.student_attn, out.teacher_attn, out.token_mask)
        results.update({f"tinybert/attn/{n}": v for n, v in zip(out.student_layers, per)})
        attn = torch.stack(per).sum()
    results["hidden"], results["attn"] = hidden, attn
    results["loss"] = results["loss"] + w_hidden * hidden + w_attn * attn
    return results


@contextlib.contextmanager
def record_features(model: nn.Module, layers: Sequence[int], enabled: bool = True) -> Iterator[dict[str, list]]:
    """While active, collect ``hidden`` (embedding output, then the output of each of ``layers``)
    and ``attn`` (their attention probabilities) of a Llama/Qwen causal LM's forward."""
    rec: dict[str, list] = {"hidden": [], "attn": []}
    if not enabled:
        yield rec
        return

    def keep_hidden(module, args, output):
        rec["hidden"].append(output[0] if isinstance(output, tuple) else output)

    def keep_attn(module, args, output):
        if output[1] is None:
            raise RuntimeError("attention probabilities need attn_implementation='eager'")
        rec["attn"].append(output[1])

    base = model.model
    handles = [base.embed_tokens.register_forward_hook(keep_hidden)]
    for i in layers:
        handles.append(base.layers[i].register_forward_hook(keep_hidden))
        handles.append(base.layers[i].self_attn.register_forward_hook(keep_attn))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
    if len(rec["hidden"]) != len(layers) + 1 or len(rec["attn"]) != len(layers):
        raise RuntimeError("each recorded layer must run exactly once per forward (no activation recomputation)")


class TinyBERTModel(KDModel):
    """:class:`~lrc.methods.kd.KDModel` plus the learned hidden-state maps; switches both models to
    eager attention. Trainable: the student and ``maps``; :meth:`save_student` exports the student only.

    shared_map: one D x d map for every hidden-state entry instead of one per entry.
    map_seed: seed of the maps' initialisation (torch's default ``nn.Linear`` init, no bias).
    """

    method = "tinybert"

    def __init__(self, teacher: nn.Module, student: nn.Module, *, shared_map: bool = False, map_seed: int = 0,
                 **kd_options: Any) -> None:
        """``kd_options``: :class:`~lrc.methods.kd.KDModel`'s ``student_layers`` and ``tokenizer``."""
        super().__init__(teacher, student, **kd_options)
        teacher.set_attn_implementation("eager")
        student.set_attn_implementation("eager")
        d, big_d = student.config.hidden_size, teacher.config.hidden_size
        count = 1 if shared_map else len(self.student_layers) + 1
        device = next(student.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(map_seed)
            maps = [nn.Linear(d, big_d, bias=False, dtype=torch.float32) for _ in range(count)]
        self.maps = nn.ModuleList(maps).to(device)

    @classmethod
    def from_teacher(cls, teacher: nn.Module, rank: int, kept_layers: Sequence[int] | None = None, *,
                     seed: int = 0, **kwargs: Any) -> "TinyBERTModel":
        """As :meth:`KDModel.from_teacher`; the maps are seeded with ``seed`` too."""
        kwargs.setdefault("map_seed", seed)
        return super().from_teacher(teacher, rank, kept_layers, seed=seed, **kwargs)

    def map_weights(self) -> list[torch.Tensor]:
        """The (D, d) map for each hidden-state entry (the same tensor repeated when shared)."""
        n = len(self.student_layers) + 1
        return [self.maps[0 if len(self.maps) == 1 else j].weight for j in range(n)]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        segment_ids: torch.Tensor | None = None,
        features: bool = True,
    ) -> TinyBERTOutput:
        """As :meth:`KDModel.forward`, plus the hidden states and attention maps of the TinyBERT
        terms unless ``features=False`` (validation)."""
        with torch.no_grad(), record_features(self.teacher, self.student_layers, features) as t:
            teacher_logits = run_causal_lm(self.teacher, input_ids, attention_mask, segment_ids)
        with record_features(self.student, range(len(self.student_layers)), features) as s:
            student_logits = run_causal_lm(self.student, input_ids, attention_mask, segment_ids)
        return TinyBERTOutput(
            student_logits,
            teacher_logits,
            None if attention_mask is None else attention_mask.bool(),
            list(self.student_layers),
            student_hidden=s["hidden"],
            teacher_hidden=t["hidden"],
            hidden_maps=self.map_weights() if features else [],
            student_attn=s["attn"],
            teacher_attn=t["attn"],
        )


# ----------------------------------------------------------------------- method=tinybert
@dataclass
class TinyBERTLossConfig(KDLossConfig):
    """The ``loss`` settings of ``method=tinybert`` (:func:`tinybert_loss`): those of
    :class:`~lrc.methods.kd.KDLossConfig` plus ``w_hidden`` and ``w_attn``."""

    w_hidden: float = 1.0
    w_attn: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("w_hidden", "w_attn"):
            if not float(getattr(self, key)) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")


class TinyBERTModule(KDModule):
    """``method=tinybert``: :class:`~lrc.methods.kd.KDModule`'s student, trained with
    :func:`tinybert_loss`. ``shared_map``: one D x d hidden-state map for every layer (as in the
    TinyBERT code) instead of one per layer. The maps train (and are decayed) with the student but
    are not exported; the terms are logged as ``train/hidden``, ``train/attn`` and, per layer,
    ``train_layers/tinybert/{hidden,attn}/<layer>``."""

    default_name = "tinybert"
    loss_config = TinyBERTLossConfig
    model_class = TinyBERTModel

    def __init__(self, *, shared_map: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shared_map = bool(shared_map)

    def model_options(self) -> dict[str, Any]:
        return {"shared_map": self.shared_map}

    def forward_options(self, training: bool) -> dict[str, Any]:
        c = self.loss_settings  # validation needs the logits only
        return {"features": training and (c.w_hidden > 0 or c.w_attn > 0)}

    def loss_terms(self, out: TinyBERTOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tinybert_loss(out, batch["input_ids"], batch.get("labels"), **asdict(self.loss_settings))
