"""Read a frozen ``transformers`` teacher into plain tensors, one dictionary per decoder layer.

Supported: ``LlamaForCausalLM`` (incl. Llama-3 rope scaling), ``Qwen2ForCausalLM`` (q/k/v
biases) and ``Qwen3ForCausalLM`` (per-head q/k RMSNorm), tied or untied embeddings. Nothing here
copies or patches transformers' modeling code: the weights are read from the loaded modules and
the teacher's own rotary-embedding module is reused as is.

Weight keys used throughout :mod:`lrc.model` (PyTorch ``[out, in]`` layout, ``None`` if absent):

==============  ==========================================  =====================
key             teacher tensor                              side touching width D
==============  ==========================================  =====================
attn_norm       input_layernorm.weight            (D,)      norm gain
wq, wk, wv      self_attn.{q,k,v}_proj.weight     (H*h, D)  input
bq, bk, bv      self_attn.{q,k,v}_proj.bias                 (copied)
q_norm, k_norm  self_attn.{q,k}_norm.weight       (h,)      (copied, Qwen3)
wo, bo          self_attn.o_proj.weight / bias    (D, H*h)  output
mlp_norm        post_attention_layernorm.weight   (D,)      norm gain
wgate, wup      mlp.{gate,up}_proj.weight         (I, D)    input
bgate, bup      mlp.{gate,up}_proj.bias                     (copied)
wdown, bdown    mlp.down_proj.weight / bias       (D, I)    output
==============  ==========================================  =====================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

WEIGHT_KEYS = (
    "attn_norm", "wq", "bq", "wk", "bk", "wv", "bv", "q_norm", "k_norm", "wo", "bo",
    "mlp_norm", "wgate", "bgate", "wup", "bup", "wdown", "bdown",
)


@dataclass(frozen=True)
class TeacherArch:
    """Shape facts of a teacher that the clone needs (all read from its config)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    tied_embeddings: bool
    max_position_embeddings: int

    @property
    def attn_scaling(self) -> float:
        return self.head_dim**-0.5


def _supported_list() -> str:
    return ", ".join(f"{cls} ({mt})" for mt, cls in SUPPORTED_ARCHITECTURES.items())


def check_teacher(teacher: object) -> None:
    """Raise ``ValueError`` unless ``teacher`` is a supported transformers causal LM."""
    if not isinstance(teacher, nn.Module) or not hasattr(teacher, "config"):
        raise ValueError(
            f"teacher must be a transformers causal LM ({_supported_list()}), got {type(teacher).__name__}"
        )
    model_type = getattr(teacher.config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported teacher architecture {model_type!r} ({type(teacher).__name__}); "
            f"supported: {_supported_list()}"
        )
    expected = SUPPORTED_ARCHITECTURES[model_type]
    if type(teacher).__name__ != expected or not hasattr(teacher, "lm_head"):
        raise ValueError(
            f"teacher must be a causal LM with an LM head ({expected}), got {type(teacher).__name__}; "
            f"load it with AutoModelForCausalLM"
        )
    config = teacher.config
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"teacher uses sliding-window attention layers ({sorted(set(layer_types))}); "
            "only full causal attention is supported"
        )
    if config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"teacher hidden_act must be 'silu' (SwiGLU FFN), got {config.hidden_act!r}")


def teacher_arch(teacher: nn.Module) -> TeacherArch:
    """Read the shape facts of a (checked) teacher."""
    check_teacher(teacher)
    c = teacher.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    embed = teacher.get_input_embeddings().weight
    head = teacher.get_output_embeddings().weight
    return TeacherArch(
        model_type=c.model_type,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=c.intermediate_size,
        vocab_size=embed.shape[0],
        rms_norm_eps=float(c.rms_norm_eps),
        hidden_act=c.hidden_act,
        # "Tied" means one tensor, not two equal ones: that is what the export can honour.
        tied_embeddings=head is embed or head.data_ptr() == embed.data_ptr(),
        max_position_embeddings=int(getattr(c, "max_position_embeddings", 0) or 0),
    )


def _maybe(module: nn.Module | None, name: str) -> torch.Tensor | None:
    if module is None:
        return None
    t = getattr(module, name, None)
    return None if t is None else t.detach()


def teacher_layer_weights(teacher: nn.Module, index: int) -> dict[str, torch.Tensor | None]:
    """The frozen tensors of teacher layer ``index`` under the keys of :data:`WEIGHT_KEYS`.

    Tensors are detached views that share storage with the teacher (no copy).
    """
    layer = teacher.model.layers[index]
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "attn_norm": _maybe(layer.input_layernorm, "weight"),
        "wq": _maybe(attn.q_proj, "weight"),
        "bq": _maybe(attn.q_proj, "bias"),
        "wk": _maybe(attn.k_proj, "weight"),
        "bk": _maybe(attn.k_proj, "bias"),
        "wv": _maybe(attn.v_proj, "weight"),
        "bv": _maybe(attn.v_proj, "bias"),
        "q_norm": _maybe(getattr(attn, "q_norm", None), "weight"),
        "k_norm": _maybe(getattr(attn, "k_norm", None), "weight"),
        "wo": _maybe(attn.o_proj, "weight"),
        "bo": _maybe(attn.o_proj, "bias"),
        "mlp_norm": _maybe(layer.post_attention_layernorm, "weight"),
        "wgate": _maybe(mlp.gate_proj, "weight"),
        "bgate": _maybe(mlp.gate_proj, "bias"),
        "wup": _maybe(mlp.up_proj, "weight"),
        "bup": _maybe(mlp.up_proj, "bias"),
        "wdown": _maybe(mlp.down_proj, "weight"),
        "bdown": _maybe(mlp.down_proj, "bias"),
    }


def teacher_io_weights(teacher: nn.Module) -> dict[str, torch.Tensor | None]:
    """Embedding, final norm and LM head (``head`` is ``None`` when tied to ``embed``)."""
    embed = teacher.get_input_embeddings().weight.detach()
    head = teacher.get_output_embeddings().weight.detach()
    tied = head.data_ptr() == embed.data_ptr()
    return {
        "embed": embed,
        "head": None if tied else head,
        "final_norm": teacher.model.norm.weight.detach(),
    }


def teacher_rotary(teacher: nn.Module) -> nn.Module:
    """The teacher's own rotary-embedding module (Llama-3 rope scaling included).

    transformers keeps the inverse frequencies in fp32 whatever the weights' dtype, and the exported
    student is reloaded that way. ``teacher.to(torch.bfloat16)`` casts them too, which shifts the
    angles by radians at long positions; in that case a fresh module of the same class is built from
    the teacher's config (fp32 frequencies, as a bf16 ``from_pretrained`` has them)."""
    rotary = teacher.model.rotary_emb
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None or inv_freq.dtype == torch.float32:
        return rotary
    return type(rotary)(config=teacher.config).to(inv_freq.device)
