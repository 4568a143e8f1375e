"""What the projections learned: their singular-value spectra over a run's checkpoints (the paper's
Table 21), and how closely the student's FFN weights keep the geometry of the teacher's neurons
(Table 22: Gram matrices over the FFN neurons, which teacher and student share).

The student keeps the teacher's FFN width ``F``, so neuron ``i`` is the same neuron in both. For an
FFN matrix with its neurons along one axis (``gate``/``up``: ``F x D``, ``down``: ``D x F`` in
transformers' ``out x in`` layout) the neuron Gram matrix ``G = W W^T`` (or ``W^T W``) is ``F x F``
in teacher and student alike, whatever the hidden sizes. With ``W_s = W_t P`` (input side) the
student's is ``W_t P P^T W_t^T``: equal to the teacher's exactly when ``P P^T = I`` (a rotation at
rank ``D``), so the similarity of the two Gram matrices measures how much of the neurons' geometry
the rank-``d`` projection keeps.

Everything here takes plain tensors or a run directory (``config.yaml``, ``checkpoints/``,
``student/``, as lrc-distill writes them); plotting is left to the caller (``notebooks/``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

#: checkpoint key -> projection name (as ``LowRankClone.named_projections`` names them)
_PROJECTION_KEY = re.compile(r"^clone\.(?:io\.proj_(?P<io>\w+)|layers\.(?P<layer>\d+)\.proj\.(?P<name>\w+))$")
#: per-step checkpoint files (``callbacks.checkpoint.save_top_k != 0``), ``step000012.ckpt``
_STEP_FILE = re.compile(r"^step(\d+)\.ckpt$")
#: FFN matrices -> (the projection that makes the student's from the teacher's, neuron axis of the weight)
FFN_MATRICES = {"gate": ("gate", 0), "up": ("up", 0), "down": ("down", 1)}
_SHARED = {"gate": "gate_up", "up": "gate_up"}  # student.ffn_sharing=io: one projection for gate and up


# ------------------------------------------------------------------------------ spectra
def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of ``matrix`` in float64, largest first."""
    return torch.linalg.svdvals(matrix.detach().to(torch.float64))


def effective_rank(values: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values (Roy & Vetterli 2007): ``n`` for
    ``n`` equal values, 1 for a single non-zero one, 0 for none."""
    s = values.detach().to(torch.float64).clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def spectrum_summary(matrix: torch.Tensor) -> dict[str, float]:
    """Largest and smallest singular value, condition number, effective rank and stable rank
    (``||M||_F^2 / sigma_max^2``) of ``matrix``."""
    s = singular_values(matrix)
    top, low = float(s[0]), float(s[-1])
    return {
        "sigma_max": top,
        "sigma_min": low,
        "condition": top / low if low > 0 else math.inf,
        "effective_rank": effective_rank(s),
        "stable_rank": float((s * s).sum()) / top**2 if top > 0 else 0.0,
    }


def checkpoint_projections(path: str | Path) -> tuple[int, dict[str, torch.Tensor]]:
    """``(global step, {projection name: P})`` of an lrc-distill checkpoint (read safely, without
    the optimizer); names as ``LowRankClone.named_projections``: ``embed``, ``head``,
    ``layers.{i}.{q,k,v,o,gate,up,down}`` (``qkv``, ``gate_up`` when shared), each ``D x d``.
    A checkpoint without any projection (another method's) raises ``ValueError``."""
    from lrc.training.checkpoint_io import load_checkpoint

    state = load_checkpoint(path, mmap=True, optimizer=False)
    found = {}
    for key, value in state.get("state_dict", {}).items():
        m = _PROJECTION_KEY.match(key)
        if m:
            name = m["io"] if m["io"] else f"layers.{m['layer']}.{m['name']}"
            found[name] = value.detach().to(torch.float32)
    if not found:
        raise ValueError(f"{path}: no LRC projections in this checkpoint (keys clone.*.proj*); is it an lrc run?")
    return int(state.get("global_step", -1)), found


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's per-step checkpoints (``checkpoints/step*.ckpt``), by step. Runs keep them with
    ``callbacks.checkpoint.save_top_k=-1``; otherwise only ``last.ckpt`` exists and is returned
    alone. ``ValueError`` when there is no checkpoint at all."""
    folder = Path(run_dir) / "checkpoints"
    steps = sorted((int(m[1]), p) for p in folder.glob("step*.ckpt") if (m := _STEP_FILE.match(p.name)))
    if steps:
        return [p for _, p in steps]
    if (folder / "last.ckpt").exists():
        return [folder / "last.ckpt"]
    raise ValueError(f"{folder}: no checkpoint (step*.ckpt or last.ckpt)")


def spectra_over_checkpoints(
    checkpoints: Iterable[str | Path], names: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """One row per checkpoint and projection: ``step``, ``projection``, the singular values
    ``sigma`` (a list, largest first) and :func:`spectrum_summary`'s numbers. ``names`` picks
    projections (default: all)."""
    rows = []
    wanted = None if names is None else list(names)
    for path in checkpoints:
        step, projections = checkpoint_projections(path)
        missing = [n for n in wanted or [] if n not in projections]
        if missing:
            raise ValueError(f"{path}: no projection named {missing}; it has {sorted(projections)[:8]}...")
        for name in wanted or projections:
            p = projections[name]
            rows.append({"step": step, "projection": name, "sigma": singular_values(p).tolist(), **spectrum_summary(p)})
    return rows


# --------------------------------------------------------------------------- Gram matrices
def neuron_gram(weight: torch.Tensor, neuron_axis: int) -> torch.Tensor:
    """The Gram matrix over the neurons on ``neuron_axis`` of ``weight`` (float32, or float64 for a float64 weight):
    ``W W^T`` for neurons along the rows (axis 0), ``W^T W`` along the columns (axis 1)."""
    if neuron_axis not in (0, 1) or weight.dim() != 2:
        raise ValueError(f"neuron_gram takes a 2-D weight and neuron_axis 0 or 1, got {tuple(weight.shape)}, {neuron_axis}")
    w = _compute(weight)
    w = w if neuron_axis == 0 else w.T
    return w @ w.T


def _compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 or float64 (half precisions and integers go to float32)."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


def gram_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two Gram matrices as vectors, ``<A, B>_F / (|A|_F |B|_F)``: 1 when one
    is a positive multiple of the other (as for a weight and a rotated, rescaled copy)."""
    if a.shape != b.shape:
        raise ValueError(f"Gram matrices of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    return float(a @ b / (a.norm() * b.norm()))


def neuron_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over neurons of the cosine between the neuron's rows of two Gram matrices (how each
    neuron relates to all the others, compared neuron by neuron)."""
    if a.shape != b.shape:
        raise ValueError(f"Gram matrices of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return float(torch.nn.functional.cosine_similarity(a.to(torch.float64), b.to(torch.float64), dim=1).mean())


def gram_similarity(teacher_weight: torch.Tensor, student_weight: torch.Tensor, neuron_axis: int) -> dict[str, float]:
    """``gram_cosine`` and ``neuron_cosine`` of the teacher's and the student's neuron Gram matrices."""
    gt, gs = neuron_gram(teacher_weight, neuron_axis), neuron_gram(student_weight, neuron_axis)
    return {"gram_cosine": gram_cosine(gt, gs), "neuron_cosine": neuron_cosine(gt, gs)}


def ffn_weights(model: Any, layer: int) -> dict[str, torch.Tensor]:
    """``{gate, up, down}`` weights (``out x in``) of decoder layer ``layer`` of a transformers
    Llama / Qwen2 / Qwen3 causal LM."""
    mlp = model.model.layers[layer].mlp
    return {"gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight}


def student_ffn_weight(teacher_weight: torch.Tensor, projection: torch.Tensor, matrix: str) -> torch.Tensor:
    """The student's FFN weight the projection makes: ``W_t P`` for ``gate``/``up`` (input side),
    ``P^T W_t`` for ``down`` (output side), as the export merges them."""
    w, p = _compute(teacher_weight), _compute(projection).to(_compute(teacher_weight).dtype)
    return p.T @ w if FFN_MATRICES[matrix][1] == 1 else w @ p


def ffn_gram_similarity(teacher: Any, student: Any, layer_map: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """Per kept layer and FFN matrix, the Gram similarity of teacher and (exported) student
    weights: rows ``{layer, matrix, gram_cosine, neuron_cosine}``. ``layer_map`` maps teacher
    layer -> student layer (:func:`student_layer_map`; default: the same index in both)."""
    layer_map = dict(layer_map) if layer_map is not None else {i: i for i in range(len(student.model.layers))}
    rows = []
    for t_layer, s_layer in sorted(layer_map.items()):
        wt, ws = ffn_weights(teacher, t_layer), ffn_weights(student, s_layer)
        for matrix, (_, axis) in FFN_MATRICES.items():
            rows.append({"layer": t_layer, "matrix": matrix, **gram_similarity(wt[matrix], ws[matrix], axis)})
    return rows


def ffn_gram_similarity_from_projections(
    teacher: Any, projections: Mapping[str, torch.Tensor], layers: Iterable[int] | None = None
) -> list[dict[str, Any]]:
    """As :func:`ffn_gram_similarity`, with the student's weights made from a checkpoint's
    projections (:func:`checkpoint_projections`) and the teacher's: the similarity at any step.
    ``layers`` picks teacher layers (default: every layer the projections cover)."""
    covered = sorted({int(m[1]) for n in projections if (m := re.match(r"layers\.(\d+)\.(gate|up|down|gate_up)$", n))})
    if layers is not None:
        missing = sorted(set(layers) - set(covered))
        if missing:
            raise ValueError(f"layers {missing} have no FFN projections here (covered: {covered})")
        covered = sorted(set(layers))
    layers = covered
    rows = []
    for layer in layers:
        wt = ffn_weights(teacher, layer)
        for matrix, (proj, axis) in FFN_MATRICES.items():
            p = projections.get(f"layers.{layer}.{proj}")
            if p is None:
                p = projections[f"layers.{layer}.{_SHARED[matrix]}"]
            ws = student_ffn_weight(wt[matrix], p, matrix)
            rows.append({"layer": layer, "matrix": matrix, **gram_similarity(wt[matrix], ws, axis)})
    return rows


# ------------------------------------------------------------------------------- run files
def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config a run wrote (``config.yaml``) as a plain dict."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no config.yaml; is it an lrc-distill run directory?")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def load_run_teacher(run_dir: str | Path) -> tuple[Any, Any]:
    """The run's teacher and tokenizer, loaded as the run loaded them (its ``teacher`` settings)."""
    from lrc.teachers import load_teacher

    return load_teacher(**run_config(run_dir)["teacher"])


def load_run_student(run_dir: str | Path) -> Any:
    """The run's exported student (``student/``), a plain transformers model in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(run_dir) / "student"
    if not (path / "config.json").is_file():
        raise ValueError(f"{run_dir}: no exported student (student/config.json); was export.enabled=false?")
    return AutoModelForCausalLM.from_pretrained(path).eval()


def student_layer_map(student_dir: str | Path) -> dict[int, int]:
    """Teacher layer -> student layer of an exported student (``lrc_clone.json``'s
    ``student_layers``: student layer ``j`` is the ``j``-th kept teacher layer)."""
    info = json.loads((Path(student_dir) / "lrc_clone.json").read_text())
    return {int(t): j for j, t in enumerate(info["student_layers"])}
