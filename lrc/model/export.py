"""Merge a clone into a plain ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``.

The merged weights come from the very methods the clone's forward uses
(:meth:`CloneDecoderLayer.student_weights`, :meth:`CloneEmbeddings.merged`), so the export cannot
drift from what was trained.  The config is the teacher's with ``hidden_size = rank``, an
explicit ``head_dim``, the kept layers only, the training RMSNorm epsilon and
``tie_word_embeddings`` only when the student's embedding and head are one matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lrc.io import atomic_directory

if TYPE_CHECKING:
    from lrc.model.clone import LowRankClone

_HF_KEYS = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "wk": "self_attn.k_proj.weight",
    "bk": "self_attn.k_proj.bias",
    "wv": "self_attn.v_proj.weight",
    "bv": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "wo": "self_attn.o_proj.weight",
    "bo": "self_attn.o_proj.bias",
    "wgate": "mlp.gate_proj.weight",
    "bgate": "mlp.gate_proj.bias",
    "wup": "mlp.up_proj.weight",
    "bup": "mlp.up_proj.bias",
    "wdown": "mlp.down_proj.weight",
    "bdown": "mlp.down_proj.bias",
}


def student_config(clone: "LowRankClone"):
    """The student's transformers config, derived from the teacher's."""
    return student_config_for(
        clone.teacher_config,
        clone.config.rank,
        layers=clone.student_layers,
        rms_norm_eps=clone.student_eps,
        tied=clone.io.student_tied,
    )


def student_config_for(
    teacher_config, rank: int, *, layers: list[int] | None = None, rms_norm_eps: float | None = None,
    tied: bool | None = None,
):
    """The teacher's transformers config with ``hidden_size = rank``, an explicit ``head_dim``, the
    kept ``layers`` (default: all), ``rms_norm_eps`` (default: the teacher's) and ``tied`` embeddings
    (default: the teacher's setting). Constructing it runs transformers' own config validation."""
    cfg = teacher_config.to_dict()
    n_teacher = int(cfg["num_hidden_layers"])
    layers = list(range(n_teacher)) if layers is None else list(layers)
    n = len(layers)
    cfg.update(
        hidden_size=rank,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        num_hidden_layers=n,
    )
    if rms_norm_eps is not None:
        cfg["rms_norm_eps"] = rms_norm_eps
    if tied is not None:
        cfg["tie_word_embeddings"] = tied
    if cfg.get("layer_types"):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in layers]
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(int(cfg["max_window_layers"] or n), n)
    for key in ("_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def _refusal(teacher_config, rank: int) -> str | None:
    """Why transformers refuses a student of hidden size ``rank`` (``None`` when it accepts it)."""
    try:
        student_config_for(teacher_config, rank)
    except (StrictDataclassError, ValueError, TypeError) as err:
        cause = err.__cause__ or err
        return " ".join(str(cause).split())
    return None


def check_exportable_rank(teacher_config, rank: int) -> None:
    """Raise ``ValueError`` if transformers would refuse to save or load the exported student of
    hidden size ``rank`` (for instance, a Llama config whose hidden size is not a multiple of the
    number of attention heads). The answer comes from building that config with transformers itself;
    the message names the nearest ranks in ``[1, teacher hidden size]`` that it accepts."""
    reason = _refusal(teacher_config, rank)
    if reason is None:
        return
    top = int(teacher_config.hidden_size)
    below = next((r for r in range(min(rank, top + 1) - 1, 0, -1) if _refusal(teacher_config, r) is None), None)
    above = next((r for r in range(max(rank, 0) + 1, top + 1) if _refusal(teacher_config, r) is None), None)
    nearest = [r for r in (below, above) if r is not None]
    hint = f"nearest exportable ranks: {', '.join(map(str, nearest))}" if nearest else "no rank can be exported"
    raise ValueError(
        f"CloneConfig.rank={rank} cannot be exported: transformers refuses a {teacher_config.model_type} "
        f"student of hidden size {rank} ({reason}); {hint}"
    )


@torch.no_grad()
def merged_state_dict(clone: "LowRankClone") -> dict[str, torch.Tensor]:
    """Student weights under transformers' parameter names (student layer j = j-th kept layer)."""
    io = clone.io.merged()
    sd = {"model.embed_tokens.weight": io["embed"], "model.norm.weight": io["final_norm"]}
    if not clone.io.student_tied:
        sd["lm_head.weight"] = io["head"]
    kept = [layer for layer in clone.layers if layer.is_student]
    for j, layer in enumerate(kept):
        for key, value in layer.student_weights().items():
            sd[f"model.layers.{j}.{_HF_KEYS[key]}"] = value
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@torch.no_grad()
def build_student(clone: "LowRankClone", dtype: torch.dtype | None = None) -> nn.Module:
    """A plain transformers causal LM holding the merged student, in eval mode."""
    config = student_config(clone)
    state = merged_state_dict(clone)
    dtype = dtype or next(iter(state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied lm_head is legitimately missing; anything else is a bug
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if clone.generation_config is not None:
        model.generation_config = clone.generation_config
    return model.to(dtype).eval()


def save_student(
    clone: "LowRankClone", path: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write the merged student, the tokenizer (if the clone has one), the generation config and
    ``lrc_clone.json`` (clone config, teacher identity, kept layers) to ``path`` atomically: the
    files go to a temporary sibling directory, are flushed to disk and the directory is renamed
    into place (:func:`lrc.io.atomic_directory`), with the permissions the umask gives."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it")
    model = build_student(clone, dtype=dtype)
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:  # the last line of defence: a NaN / Inf weight (or a float16 overflow) is never written
        raise ValueError(f"refusing to export to {path}: the merged student has non-finite weights in {bad[:5]}")
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        if clone.tokenizer is not None:
            clone.tokenizer.save_pretrained(tmp)
        meta = {
            "clone_config": clone.config.to_dict(),
            "teacher": getattr(clone.teacher_config, "_name_or_path", None),
            "teacher_model_type": clone.arch.model_type,
            "student_layers": clone.student_layers,
            "tied_embeddings": clone.io.student_tied,
        }
        (tmp / "lrc_clone.json").write_text(json.dumps(meta, indent=2, default=str))
    return path
