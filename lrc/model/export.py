"""Merge a clone into a plain ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``.

The merged weights come from the very methods the clone's forward uses
(:meth:`CloneDecoderLayer.student_weights`, :meth:`CloneEmbeddings.merged`), so the export cannot
drift from what was trained.  The config is the teacher's with ``hidden_size = rank``, an
explicit ``head_dim``, the kept layers only, the training RMSNorm epsilon and
``tie_word_embeddings`` only when the student's embedding and head are one matrix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

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
    arch = clone.arch
    cfg = clone.teacher_config.to_dict()
    n = len(clone.student_layers)
    cfg.update(
        hidden_size=clone.config.rank,
        head_dim=arch.head_dim,
        num_hidden_layers=n,
        rms_norm_eps=clone.student_eps,
        tie_word_embeddings=clone.io.student_tied,
    )
    if cfg.get("layer_types"):
        cfg["layer_types"] = [cfg["layer_types"][i] for i in clone.student_layers]
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(int(cfg["max_window_layers"] or n), n)
    for key in ("_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


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
    files go to a temporary sibling directory that is renamed into place."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_student(clone, dtype=dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
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
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
