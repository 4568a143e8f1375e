"""Multiple-choice tasks scored by log-likelihood, the way lm-evaluation-harness scores them.

An item is a ``context``, its ``choices`` and the index of the right one (``gold``). Each choice
is scored as the summed log-probability of ``target_delimiter + choice`` given the context; the
prediction is the argmax (``acc``) or the argmax of the sum divided by the choice's length in
characters (``acc_norm``, lm-eval's definition: ``len(choice)``, the delimiter not counted).

Tokenisation follows lm-eval's ``HFLM`` exactly, so the two scorers agree: whitespace that ends
the context moves to the start of the continuation, the continuation's tokens are those of
``encode(context + continuation)`` after the first ``len(encode(context))``, the tokenizer adds
its special tokens as it does by default, and an input longer than the model's context keeps its
last ``max_length + 1`` tokens.

Local task files (JSON lines, or a JSON list) hold one item per row:
``{"context": "...", "choices": ["...", ...], "gold": 0}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["MCItem", "encode_pair", "read_mc_file", "score_items", "summarize", "write_mc_file"]

DELIMITER = " "


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    gold: int

    def to_json(self) -> dict[str, Any]:
        return {"context": self.context, "choices": list(self.choices), "gold": self.gold}


def read_mc_file(path: str | Path) -> list[MCItem]:
    """Items of a local multiple-choice file (JSON lines, or one JSON list). ``ValueError`` names
    the file, the line (or list index) and the field of a bad row; ``FileNotFoundError`` a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice task file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of items, got {type(rows).__name__}")
        numbered = [(f"item {i}", r) for i, r in enumerate(rows)]
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({err.msg})") from None
    items = [_item(row, f"{path}, {where}") for where, row in numbered]
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _item(row: Any, where: str) -> MCItem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with context, choices and gold")
    context, choices, gold = row.get("context"), row.get("choices"), row.get("gold")
    if not isinstance(context, str):
        raise ValueError(f"{where}: field 'context' must be a string, got {context!r}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: field 'gold' must be an index into choices (0..{len(choices) - 1}), got {gold!r}")
    return MCItem(context, tuple(choices), gold)


def write_mc_file(items: Sequence[MCItem], path: str | Path) -> Path:
    """Write ``items`` as JSON lines (atomically)."""
    from lrc.io import atomic_write

    path = Path(path)
    with atomic_write(path, "w") as fh:
        fh.write("".join(json.dumps(i.to_json(), ensure_ascii=False) + "\n" for i in items))
    return path


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as lm-eval's ``HFLM`` makes them (see the module doc).
    An empty context becomes the tokenizer's bos token (eos without one), lm-eval's prefix token."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], _encode(tokenizer, continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _encode(tokenizer: Any, text: str) -> list[int]:
    bos = tokenizer.bos_token
    if bos is not None and text.startswith(bos):  # lm-eval: no second bos when the text has one
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def score_items(model: Any, tokenizer: Any, items: Sequence[MCItem], batch_size: int = 8,
                delimiter: str = DELIMITER) -> list[dict[str, Any]]:
    """Per item: ``lls`` (summed log-probabilities of each choice), ``pred``, ``pred_norm``,
    ``acc`` and ``acc_norm`` (1.0 or 0.0). Runs the model without gradients on its own device."""
    import torch

    requests = [(i, c, *encode_pair(tokenizer, item.context, delimiter + choice))
                for i, item in enumerate(items) for c, choice in enumerate(item.choices)]
    max_len = _max_length(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lls: dict[tuple[int, int], float] = {}
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]) - len(requests[r][3]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [requests[r] for r in order[start:start + batch_size]]
            rows = [(ctx + cont)[-(max_len + 1):][:-1] for _, _, ctx, cont in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
            for j, (i, c, _, cont) in enumerate(batch):
                n = len(rows[j])
                picked = logp[j, n - len(cont):n].gather(-1, torch.tensor(cont, device=device)[:, None])
                lls[(i, c)] = float(picked.sum())
    out = []
    for i, item in enumerate(items):
        scores = [lls[(i, c)] for c in range(len(item.choices))]
        pred = max(range(len(scores)), key=lambda c: (scores[c], -c))
        norm = [s / len(ch) for s, ch in zip(scores, item.choices)]
        pred_norm = max(range(len(norm)), key=lambda c: (norm[c], -c))
        out.append({"lls": scores, "pred": pred, "pred_norm": pred_norm, "gold": item.gold,
                    "acc": float(pred == item.gold), "acc_norm": float(pred_norm == item.gold)})
    return out


def summarize(scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``acc``, ``acc_norm`` (means over items) and ``n``."""
    n = len(scored)
    return {"acc": sum(s["acc"] for s in scored) / n if n else math.nan,
            "acc_norm": sum(s["acc_norm"] for s in scored) / n if n else math.nan, "n": n}


def _max_length(model: Any) -> int:
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    return 2048
