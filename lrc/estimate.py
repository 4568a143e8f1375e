"""What an LRC run costs, counted from the teacher's config alone (no weight is loaded): parameters
(frozen, trainable, deployed), FLOPs per token and memory per device. ``lrc-estimate`` prints it
before a launch; the throughput callback turns the FLOPs per token into TFLOP/s and MFU.

Conventions. A multiply-add is 2 FLOPs; only matrix products count (norms, softmax, the MSEs are
elementwise). Attention scores and values count ``4 * heads * head_dim * seq_len`` per token and
layer in the forward, without halving for causality (the PaLM convention for MFU). A backward costs
twice its forward, except where a side needs no gradient (the frozen teacher factors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lrc.losses import DEVICE_TILE_BYTES, teacher_activations_read
from lrc.model.checkpointing import CHECKPOINTING_MODES
from lrc.model.layers import choose_projection_path, projection_path_flops

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class TeacherShape:
    """The shape facts of a Llama / Qwen2 / Qwen3 teacher config that the counts need."""

    model_type: str
    layers: int
    hidden: int  # D
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # I
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, c: Any) -> "TeacherShape":
        model_type = str(c.model_type)
        attention_bias = bool(getattr(c, "attention_bias", False))
        return cls(
            model_type=model_type,
            layers=int(c.num_hidden_layers),
            hidden=int(c.hidden_size),
            heads=int(c.num_attention_heads),
            kv_heads=int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads),
            head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads),
            ffn=int(c.intermediate_size),
            vocab=int(c.vocab_size),
            tied=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_matrix_params(self, width: int) -> int:
        """Weights of one decoder layer's seven matrices at residual width ``width``."""
        return width * (2 * self.q_width + 2 * self.kv_width + 3 * self.ffn)

    def layer_params(self, width: int) -> int:
        """All parameters of one decoder layer at residual width ``width`` (biases, norms included)."""
        n = self.layer_matrix_params(width) + 2 * width
        n += (self.q_width + 2 * self.kv_width) * self.qkv_bias + width * self.o_bias
        n += (2 * self.ffn + width) * self.mlp_bias + 2 * self.head_dim * self.qk_norm
        return n

    def model_params(self, width: int, layers: int, tied: bool) -> int:
        """A whole causal LM (embedding, layers, final norm, head unless tied) at ``width``."""
        return self.vocab * width * (1 if tied else 2) + layers * self.layer_params(width) + width


@dataclass(frozen=True)
class StudentPlan:
    """The clone's settings the counts need (resolved: kept layers, head tying)."""

    rank: int
    kept_layers: tuple[int, ...]
    attn_sharing: str = "all"
    ffn_sharing: str = "all"
    tie_head_projection: bool = True  # resolved: P_head is P_embed
    learned_alignment: bool = False
    projection_path: str = "auto"

    def projections_per_layer(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        attn = {"qkv": ("q", "k", "v")} if self.attn_sharing == "io" else {k: (k,) for k in "qkv"}
        ffn = {"gate_up": ("gate", "up")} if self.ffn_sharing == "io" else {"gate": ("gate",), "up": ("up",)}
        groups = {n: ("input", m) for n, m in {**attn, **ffn}.items()}
        groups.update({"o": ("output", ("o",)), "down": ("output", ("down",))})
        return groups


def inner_width(shape: TeacherShape, matrix: str) -> int:
    """The head / FFN side width of matrix ``matrix`` (q, k, v, o, gate, up, down)."""
    return {"q": shape.q_width, "k": shape.kv_width, "v": shape.kv_width, "o": shape.q_width,
            "gate": shape.ffn, "up": shape.ffn, "down": shape.ffn}[matrix]


def parameter_counts(shape: TeacherShape, student: StudentPlan) -> dict[str, int]:
    """``frozen`` (the teacher), ``projections``, ``gains``, ``alignments``, ``trainable`` (their sum)
    and ``deployed`` (the exported student; its embedding and head are one matrix when the teacher
    ties its head and the projection is tied)."""
    big, d, kept = shape.hidden, student.rank, len(student.kept_layers)
    projections = big * d * (1 + (not student.tie_head_projection) + kept * len(student.projections_per_layer()))
    gains = d * (1 + 2 * kept)
    alignments = 2 * big * d * kept if student.learned_alignment else 0
    student_tied = shape.tied and student.tie_head_projection
    return {
        "frozen": shape.model_params(big, shape.layers, shape.tied),
        "projections": projections,
        "gains": gains,
        "alignments": alignments,
        "trainable": projections + gains + alignments,
        "deployed": shape.model_params(d, kept, student_tied),
    }


@dataclass(frozen=True)
class LossPlan:
    """Which clone terms run, in which space (``LossConfig``'s keys that change the FLOPs)."""

    terms: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    clone_layers: int | None = None  # layers carrying terms (None = every kept layer)
    attn_out_space: str = "teacher"
    detach_down_target: bool = False
    detach_o_target: bool = False
    learned_alignment: bool = False


def flops_per_token(
    shape: TeacherShape, student: StudentPlan, loss: LossPlan, seq_len: int, tokens_per_forward: int
) -> dict[str, float]:
    """FLOPs per training token of one LRC step, by part:

    - ``teacher_forward``: the teacher's matrices and head, ``2 * matrix params + attention``;
    - ``student_forward``, ``student_backward``: a plain student of the exported shape (its matrices
      and head; backward = 2 x forward), plus the clone's embedding ``E[ids] @ P_embed``
      (``2Dd`` forward, ``2Dd`` for ``P_embed``'s gradient);
    - ``weight_products``: what the projections cost on top of applying a plain student's matrices,
      per projection by its path (:func:`~lrc.model.layers.projection_path_flops` minus ``6nds``;
      materialised: ``4Dds`` per forward) and the head's ``V x D x d`` product (forward and P's
      gradient), spread over the ``tokens_per_forward`` tokens of a micro-batch;
    - ``clone_terms``: the terms' extra products: ``o`` in teacher space pushes the student's heads
      through the teacher's ``W_o`` (``2 H h D`` + ``2 H h D`` backward); a projected target
      ``y_t @ P`` (``down``; ``o`` in student space) costs ``2Dd`` plus ``2Dd`` for P's gradient
      unless detached; a learned alignment ``y_s @ A.T`` costs ``2dD`` forward and ``4dD`` backward;
    - ``unavoidable``: teacher forward + plain student forward and backward (the LRC step's floor
      without its own overheads), and ``total``.
    """
    big, d, t, n = shape.hidden, student.rank, int(seq_len), int(tokens_per_forward)
    kept = len(student.kept_layers)
    attn_t = 4 * shape.q_width * t  # scores and weighted values, per layer, forward
    teacher = 2 * (shape.layers * shape.layer_matrix_params(big) + shape.vocab * big) + shape.layers * attn_t
    plain_fwd = 2 * (kept * shape.layer_matrix_params(d) + shape.vocab * d) + kept * attn_t
    embed = 2 * big * d
    products = 0.0
    for side, matrices in student.projections_per_layer().values():
        inner = [inner_width(shape, m) for m in matrices]
        path = choose_projection_path(student.projection_path, n, inner, big, d)
        apply_plain = 6 * n * d * sum(inner)
        products += kept * (projection_path_flops(n, inner, big, d)[path] - apply_plain)
    products += 4 * shape.vocab * big * d  # H @ P_head (tied or not) forward, and P_head's gradient
    term_layers = kept if loss.clone_layers is None else loss.clone_layers
    terms = 0.0
    for term in ("o", "down"):
        if term not in loss.terms:
            continue
        if loss.learned_alignment:
            terms += 6 * d * big
        elif term == "o" and loss.attn_out_space == "teacher":
            terms += 4 * shape.q_width * big
        else:
            detached = loss.detach_down_target if term == "down" else loss.detach_o_target
            terms += 2 * big * d * (1 if detached else 2)
    out = {
        "teacher_forward": float(teacher),
        "student_forward": float(plain_fwd + embed),
        "student_backward": float(2 * plain_fwd + embed),
        "weight_products": products / n,
        "clone_terms": float(terms * term_layers),
    }
    out["unavoidable"] = float(teacher + 3 * plain_fwd)
    out["total"] = sum(v for k, v in out.items() if k != "unavoidable")
    return out


def teacher_target_width(shape: TeacherShape, terms: tuple[str, ...]) -> int:
    """Elements per token and layer of the teacher activations the clone terms ``terms`` read
    (:func:`lrc.losses.teacher_activations_read`): what a layer keeps for its backward under
    ``activation_checkpointing: student``. q is H*h wide, k and v kv_heads*h, gate and up I, the
    o and down outputs and the normalised inputs (``attn_in`` / ``ffn_in``) D, ``attn`` H*h,
    ``ffn_hidden`` I."""
    width = {"q": shape.q_width, "k": shape.kv_width, "v": shape.kv_width, "attn": shape.q_width,
             "o": shape.hidden, "gate": shape.ffn, "up": shape.ffn, "ffn_hidden": shape.ffn,
             "down": shape.hidden, "attn_input": shape.hidden, "ffn_input": shape.hidden}
    return sum(width[k] for k in teacher_activations_read(terms))


def activation_bytes_per_token(
    shape: TeacherShape, student: StudentPlan, compute_bytes: int, checkpointing: str = "off",
    loss: LossPlan | None = None,
) -> float:
    """Approximate bytes of activations kept for the backward, per token of a micro-batch.

    ``checkpointing`` "off": each kept layer keeps the student's inputs of its products (two norm
    inputs and outputs of width d, q/k/v, the attention output, gate, up and their product) and the
    terms' fp32 differences (q, k, v, o in width D, gate, up, down). "full" (per-layer activation
    checkpointing): only each layer's two stream inputs (d and D) stay, plus one layer's activations
    while it is recomputed. "student": as "full", plus each layer's teacher activations its clone
    terms (``loss.terms``, the paper's seven by default, on ``loss.clone_layers`` layers) read,
    :func:`teacher_target_width`.
    """
    d, big = student.rank, shape.hidden
    inner = shape.q_width + 2 * shape.kv_width
    per_layer = compute_bytes * (4 * d + inner + 2 * shape.q_width + 3 * shape.ffn)
    per_layer += 4 * (inner + big + 2 * shape.ffn + d)
    kept = len(student.kept_layers)
    if checkpointing == "full":
        return kept * compute_bytes * (d + big) + per_layer
    if checkpointing == "student":
        loss = loss or LossPlan()
        term_layers = kept if loss.clone_layers is None else loss.clone_layers
        targets = term_layers * teacher_target_width(shape, loss.terms)
        return compute_bytes * (kept * (d + big) + targets) + per_layer
    if checkpointing != "off":
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING_MODES}, got {checkpointing!r}")
    return kept * per_layer


def memory_per_device(
    shape: TeacherShape,
    student: StudentPlan,
    *,
    tokens_per_forward: int,
    strategy: str = "single",
    devices: int = 1,
    teacher_bytes: int = 4,
    param_bytes: int = 4,
    compute_bytes: int = 4,
    logit_chunk_size: int | None = None,
    loss: LossPlan | None = None,
) -> dict[str, dict[str, float]]:
    """Bytes per device by part for each activation-checkpointing setting,
    ``{"off": {...}, "full": {...}, "student": {...}}`` (:func:`activation_bytes_per_token`;
    ``loss``: the clone terms, whose teacher targets "student" keeps).

    ``strategy``: "single" (one device), "ddp" (everything replicated), "fsdp" (teacher, trainable
    tensors, gradients and Adam state sharded over ``devices``). Adam keeps two states per trainable
    element in its dtype. The merged student matrices of one layer exist while it runs (all layers'
    without checkpointing). Logits (:func:`lrc.losses.chunked_ce_kl`): for one chunk of
    ``logit_chunk_size`` positions (every position without it), both models' logits in the compute
    dtype, their fp32 copies when that is half precision, and four fp32 temporaries of one tile of
    rows (log-probabilities of both models, the teacher's probabilities, the scaled student logits;
    ``lrc.losses.DEVICE_TILE_BYTES`` per temporary on a GPU, the figure given here; a CPU's tiles
    are cache-sized), plus the kept gradient of the student's hidden states.
    """
    if strategy not in ("single", "ddp", "fsdp"):
        raise ValueError(f"strategy must be single, ddp or fsdp, got {strategy!r}")
    shard = devices if strategy == "fsdp" else 1
    counts = parameter_counts(shape, student)
    trainable = counts["trainable"] * param_bytes / shard
    base = {
        "teacher": counts["frozen"] * teacher_bytes / shard,
        "trainable": trainable,
        "gradients": trainable,
        "adam_state": 2 * trainable,
    }
    n = int(tokens_per_forward)
    merged_layer = shape.layer_matrix_params(student.rank) * compute_bytes
    head = shape.vocab * student.rank * compute_bytes * 2  # merged head and its gradient
    rows = min(int(logit_chunk_size), n) if logit_chunk_size else n
    tile_rows = min(rows, max(1, DEVICE_TILE_BYTES // (4 * shape.vocab)))
    upcast = 8 if compute_bytes < 4 else 0
    logits = (rows * shape.vocab * (2 * compute_bytes + upcast) + tile_rows * shape.vocab * 16
              + n * student.rank * compute_bytes)
    out = {}
    for mode in CHECKPOINTING_MODES:
        parts = dict(base)
        parts["merged_weights"] = merged_layer * (len(student.kept_layers) if mode == "off" else 1) + head
        parts["activations"] = n * activation_bytes_per_token(shape, student, compute_bytes, mode, loss)
        parts["logits"] = float(logits)
        parts["total"] = sum(parts.values())
        out[mode] = parts
    return out


def precision_bytes(precision: str, teacher_dtype: str, param_dtype: str) -> dict[str, int]:
    """Bytes per element of the teacher, the trainable tensors and the compute, for a Lightning
    ``precision`` ("32-true", "bf16-mixed", "bf16-true", ...), ``teacher.dtype`` and ``student.param_dtype``."""
    teacher = BYTES.get(str(teacher_dtype), 4)
    compute = 2 if str(precision).startswith(("bf16", "16")) else teacher
    param = teacher if param_dtype == "teacher" else BYTES.get(str(param_dtype), 4)
    return {"teacher": teacher, "param": param, "compute": compute}
