"""Reading ``curves.csv`` (written by :class:`lrc.training.curves.CurvesLogger`): plain Python, no
Lightning or torch, so ``lrc-collect`` starts fast."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping

CURVES_FILE = "curves.csv"
FIXED_COLUMNS = ("step", "tokens_seen", "wall_s")


def read_curves(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``curves.csv`` as dicts of floats (``step`` and ``tokens_seen`` as ints);
    empty cells are left out of a row. Raises ``ValueError`` naming the file and line for a cell
    that is not a number."""
    path = Path(path)
    rows = []
    with path.open(newline="") as f:
        for line, raw in enumerate(csv.DictReader(f), start=2):
            row: dict[str, Any] = {}
            for key, cell in raw.items():
                if key is None or cell in (None, ""):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise ValueError(f"{path}, line {line}: column {key!r} holds {cell!r}, not a number") from None
                row[key] = int(value) if key in ("step", "tokens_seen") and math.isfinite(value) else value
            rows.append(row)
    return rows


def validation_points(rows: list[Mapping[str, Any]], metric: str = "val/ce") -> list[dict[str, Any]]:
    """The rows that carry ``metric``, one per ``tokens_seen`` (the first logged: a later one at the
    same count, such as the final validation after the last in-training one, saw the same weights),
    ordered by tokens."""
    by_tokens: dict[int, Mapping[str, Any]] = {}
    for row in rows:
        if metric in row and "tokens_seen" in row:
            by_tokens.setdefault(int(row["tokens_seen"]), row)
    return [dict(by_tokens[t]) for t in sorted(by_tokens)]


def best_validation(rows: list[Mapping[str, Any]], metric: str = "val/ce") -> dict[str, Any] | None:
    """The validation with the lowest ``metric`` (the earliest on ties): its ``val/*`` values without
    the prefix, plus ``step``, ``tokens_seen`` and ``wall_s``. ``None`` when nothing was validated."""
    points = [p for p in validation_points(rows, metric) if math.isfinite(p[metric])]
    if not points:
        return None
    best = min(points, key=lambda p: p[metric])
    out = {k.removeprefix("val/"): v for k, v in best.items() if k.startswith("val/")}
    out.update({k: best[k] for k in FIXED_COLUMNS if k in best})
    return out


#: where ``logger=csv`` writes every logged metric, the per-layer ones included (``curves.csv`` keeps
#: only ``train/*``, ``val/*`` and ``eval/*``)
LOGGED_METRICS_FILE = "csv/metrics.csv"


def per_layer_terms(rows: list[Mapping[str, Any]], prefix: str = "train_layers/clone/") -> dict[str, dict[str, list]]:
    """The per-layer values logged as ``<prefix><term>/<layer>`` (every ``log.per_layer_every_n_steps``
    steps), by term: ``{term: {"steps": [...], "layers": [...], "values": [[value per layer] per
    step]}}``, steps and layers ascending, ``nan`` where a step lacks a layer."""
    found: dict[str, dict[tuple[int, int], float]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith(prefix) or "step" not in row:
                continue
            term, _, layer = key[len(prefix):].rpartition("/")
            if term and layer.isdigit():
                found.setdefault(term, {})[(int(row["step"]), int(layer))] = float(value)
    out = {}
    for term, cells in sorted(found.items()):
        steps = sorted({s for s, _ in cells})
        layers = sorted({la for _, la in cells})
        values = [[cells.get((s, la), math.nan) for la in layers] for s in steps]
        out[term] = {"steps": steps, "layers": layers, "values": values}
    return out
