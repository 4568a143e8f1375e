"""FFN neuron masking (the paper's Table 5): does the student rely on the same FFN neurons as its
teacher?

The student keeps the teacher's FFN width, so neuron ``i`` of a layer (a row of ``gate``/``up``, a
column of ``down``) is the same neuron in both. Find the neurons the teacher activates most on a
set of prompts, switch them off in the teacher and the same indices in the student, and compare the
loss with switching off as many random neurons. A neuron is switched off by zeroing its activation
``act(gate x) * up x`` before ``down_proj``, which is the same as zeroing column ``i`` of ``down``.

Works on any transformers Llama / Qwen2 / Qwen3 causal LM (``model.model.layers[i].mlp``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

#: what :func:`masking_study` compares
MASKS = ("none", "top", "random")


def _down_projs(model: Any) -> list[torch.nn.Module]:
    return [layer.mlp.down_proj for layer in model.model.layers]


def ffn_width(model: Any) -> int:
    """Neurons per FFN layer (``intermediate_size``)."""
    return int(model.model.layers[0].mlp.down_proj.in_features)


@torch.no_grad()
def neuron_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(layers, F)``: each FFN neuron's mean absolute activation (the input of ``down_proj``)
    over the tokens of ``input_ids`` (those with ``attention_mask`` 1)."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    sums: list[torch.Tensor] = []

    def hook(_module, args):
        act = args[0].detach().to(torch.float64).abs()  # (B, T, F)
        sums.append((act * mask.unsqueeze(-1)).sum(dim=(0, 1)))

    handles = [m.register_forward_pre_hook(hook) for m in _down_projs(model)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(sums) / mask.sum().clamp_min(1)


def top_neurons(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(layers, k)``: per layer, the indices of the ``k`` highest scores, highest first."""
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"k must be in [0, {scores.shape[-1]}], got {k}")
    return torch.topk(scores, k, dim=-1).indices


def random_neurons(num_layers: int, width: int, k: int, seed: int = 0, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``(num_layers, k)``: per layer, ``k`` distinct neurons drawn uniformly (seeded), avoiding
    ``exclude[layer]`` (e.g. the top neurons) when given."""
    if not 0 <= k <= width:
        raise ValueError(f"k must be in [0, {width}], got {k}")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for layer in range(num_layers):
        pool = torch.arange(width)
        if exclude is not None:
            pool = pool[~torch.isin(pool, exclude[layer])]
            if len(pool) < k:
                raise ValueError(f"layer {layer}: only {len(pool)} neurons left outside exclude, need {k}")
        rows.append(pool[torch.randperm(len(pool), generator=gen)[:k]])
    return torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.long)


@contextmanager
def masked_neurons(model: Any, neurons: Mapping[int, Sequence[int] | torch.Tensor]) -> Iterator[None]:
    """Within the block, the FFN neurons ``neurons[layer]`` of ``model`` output zero (their
    activation is zeroed before ``down_proj``). Layers not named are untouched."""
    projs = _down_projs(model)
    handles = []
    for layer, idx in neurons.items():
        if not 0 <= int(layer) < len(projs):
            raise ValueError(f"layer {layer} is out of range: the model has {len(projs)} layers")
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.numel() == 0:
            continue

        def hook(_module, args, idx=idx):
            x = args[0].clone()
            x[..., idx.to(x.device)] = 0
            return (x, *args[1:])

        handles.append(projs[int(layer)].register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def next_token_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy over the predicted positions of ``input_ids`` (those whose
    target has ``attention_mask`` 1)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100))


def masking_study(
    teacher: Any,
    student: Any,
    input_ids: torch.Tensor,
    k: int,
    *,
    attention_mask: torch.Tensor | None = None,
    layer_map: Mapping[int, int] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Table 5: the teacher's ``k`` most activated neurons per layer on ``input_ids`` (scored by
    :func:`neuron_scores`), masked in the teacher and at the same indices in the student, against
    ``k`` random neurons per layer (distinct from the top ones). Rows ``{model, mask, loss,
    delta}``, ``delta`` = loss minus the unmasked loss. ``layer_map`` maps teacher layer -> student
    layer (:func:`lrc.analysis.projections.student_layer_map`; default: the same index; teacher
    layers the student does not keep are masked in the teacher only)."""
    if ffn_width(teacher) != ffn_width(student):
        raise ValueError(f"teacher and student FFN widths differ ({ffn_width(teacher)} vs {ffn_width(student)}): "
                         f"neuron i is not the same neuron in both")
    n_layers = len(teacher.model.layers)
    layer_map = dict(layer_map) if layer_map is not None else {i: i for i in range(len(student.model.layers))}
    scores = neuron_scores(teacher, input_ids, attention_mask)
    top = top_neurons(scores, k)
    chosen = {"none": None, "top": top, "random": random_neurons(n_layers, ffn_width(teacher), k, seed, exclude=top)}
    rows = []
    for name, model, mapping in (("teacher", teacher, {i: i for i in range(n_layers)}), ("student", student, layer_map)):
        base = None
        for mask in MASKS:
            idx = chosen[mask]
            neurons = {} if idx is None else {mapping[t]: idx[t] for t in range(n_layers) if t in mapping}
            with masked_neurons(model, neurons):
                loss = next_token_loss(model, input_ids, attention_mask)
            base = loss if mask == "none" else base
            rows.append({"model": name, "mask": mask, "loss": loss, "delta": loss - base})
    return rows
