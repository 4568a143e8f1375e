"""The plain student of the baselines: exactly the shape of the LRC export, randomly initialised.

- :func:`plain_student_config`: the teacher's transformers config with ``hidden_size = rank``, an
  explicit ``head_dim``, the kept layers only, the student's RMSNorm epsilon and its embedding tying
  (:func:`lrc.model.export.student_config_for`, the LRC export's own rules).
- :func:`random_student`: ``AutoModelForCausalLM.from_config`` of that config, seeded.
- :func:`save_plain_student`: write a student, its tokenizer and generation config atomically.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lrc.io import atomic_directory
from lrc.model.export import student_config_for

STUDENT_META = "lrc_student.json"


def kept_teacher_layers(layers: Sequence[int] | None, num_teacher_layers: int) -> list[int]:
    """Sorted teacher layer indices the student keeps (``None`` = all); ``ValueError`` if bad."""
    if layers is None:
        return list(range(num_teacher_layers))
    layers = list(layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_teacher_layers]
    if not layers or bad or len(set(layers)) != len(layers):
        raise ValueError(
            f"kept_layers must be distinct teacher layer indices in [0, {num_teacher_layers - 1}], got {layers}"
        )
    return sorted(layers)


def plain_student_config(
    teacher_config: Any,
    rank: int,
    kept_layers: Sequence[int] | None = None,
    rms_norm_eps: float | None = None,
    tie_word_embeddings: bool | None = None,
):
    """The student's transformers config (same ``model_type`` as the teacher).

    rank: hidden size d in [1, D]. kept_layers: teacher layer indices (``None`` = all); student
    layer j is teacher layer ``sorted(kept_layers)[j]``. rms_norm_eps / tie_word_embeddings:
    ``None`` = the teacher's. Heads, head_dim, FFN width, vocabulary and RoPE stay the teacher's.
    """
    c = teacher_config
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= c.hidden_size:
        raise ValueError(f"rank must be an integer in [1, {c.hidden_size}] (the teacher's hidden size), got {rank!r}")
    layers = kept_teacher_layers(kept_layers, c.num_hidden_layers)
    return student_config_for(c, rank, layers=layers, rms_norm_eps=rms_norm_eps, tied=tie_word_embeddings)


def random_student(
    teacher_config: Any,
    rank: int,
    kept_layers: Sequence[int] | None = None,
    *,
    seed: int = 0,
    init_std: float | None = None,
    rms_norm_eps: float | None = None,
    tie_word_embeddings: bool | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A randomly initialised plain student of :func:`plain_student_config`'s shape, in train mode.

    Initialisation is transformers' own ``_init_weights``, run under ``torch.manual_seed(seed)``
    (the global RNG state is restored afterwards): every linear and embedding weight N(0, std),
    biases 0, RMSNorm gains 1, the ``pad_token_id`` embedding row 0. ``std`` is ``init_std`` if
    given, else the teacher config's ``initializer_range`` (0.02 for Llama / Qwen; SmolLM2 ~0.042).
    The returned config keeps the teacher's ``initializer_range``.
    """
    config = plain_student_config(teacher_config, rank, kept_layers, rms_norm_eps, tie_word_embeddings)
    if init_std is not None and not (isinstance(init_std, (int, float)) and init_std > 0):
        raise ValueError(f"init_std must be > 0 or None, got {init_std!r}")
    kept_range = getattr(config, "initializer_range", None)
    if init_std is not None:
        config.initializer_range = float(init_std)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    model.config.initializer_range = kept_range
    return model.train()


@torch.no_grad()
def save_plain_student(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (cast to ``dtype`` on a copy if given), its generation config, ``tokenizer``
    (if any) and ``metadata`` (as ``lrc_student.json``) to ``path`` atomically
    (:func:`lrc.io.atomic_directory`). ``FileExistsError`` if ``path`` is not empty and not
    ``overwrite``; ``ValueError`` (nothing written) if a weight is NaN / Inf. Returns ``path``."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty; pass overwrite=True to replace it")
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"refusing to export to {path}: the student has non-finite weights in {bad[:5]}")
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if metadata is not None:
            (tmp / STUDENT_META).write_text(json.dumps(dict(metadata), indent=2, default=str) + "\n")
    return path
