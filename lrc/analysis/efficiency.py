"""Token efficiency (Figure 3's question put as a number): how many training tokens a baseline needs
to reach the validation metric another variant reaches after N tokens.

Pure functions over the mean validation curves :func:`lrc.analysis.collect.curve_series` returns
(``x`` = tokens, ``mean`` = metric, lower is better). Between validation points a curve is taken
as piecewise linear; a baseline that never gets there within its tokens gives a lower bound.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def tokens_to_reach(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
    """The first ``x`` at which the piecewise-linear curve through ``(x, y)`` falls to ``target``
    or below (``x`` increasing); ``None`` when it never does within its points."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length ({len(x)} vs {len(y)})")
    for i, (xi, yi) in enumerate(zip(x, y)):
        if yi <= target:
            if i == 0:
                return float(xi)
            x0, y0 = x[i - 1], y[i - 1]  # y0 > target >= yi: interpolate the crossing
            return float(x0 + (xi - x0) * (y0 - target) / (y0 - yi))
    return None


def token_efficiency(variant: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    """For every validation point ``(N, v)`` of ``variant`` after some training (``N > 0``): the tokens
    the ``baseline`` curve needs to reach ``v`` and their ratio to ``N``. When the baseline never
    reaches ``v``, ``baseline_tokens`` is ``None``, ``ratio`` is the lower bound (its last token
    count / N) and ``lower_bound`` is true."""
    bx, by = list(baseline["x"]), list(baseline["mean"])
    rows = []
    for n, v in zip(variant["x"], variant["mean"]):
        if n <= 0:
            continue
        t = tokens_to_reach(bx, by, v)
        if t is None:
            rows.append({"tokens": n, "value": v, "baseline_tokens": None,
                         "ratio": (bx[-1] / n) if bx else None, "lower_bound": True})
        else:
            rows.append({"tokens": n, "value": v, "baseline_tokens": t, "ratio": t / n, "lower_bound": False})
    return rows


def efficiency_markdown(tables: Mapping[str, list[dict[str, Any]]], baseline: str, metric: str) -> list[str]:
    """The report's token-efficiency section: one table per variant (``tables``: name -> rows of
    :func:`token_efficiency`)."""
    lines = ["", "## Token efficiency", "",
             f"Tokens `{baseline}` needs to reach the mean {metric} each variant reaches after N tokens "
             "(mean curves over seeds, linear between validation points); `> r` where the baseline never "
             "gets there within its tokens (a lower bound).", ""]
    for name, rows in tables.items():
        lines += [f"### `{name}`", "", f"| N (tokens) | {metric} at N | baseline tokens | ratio |", "|---|---|---|---|"]
        for r in rows:
            base = "never" if r["baseline_tokens"] is None else f"{r['baseline_tokens']:,.0f}"
            ratio = "-" if r["ratio"] is None else (f"> {r['ratio']:.2f}" if r["lower_bound"] else f"{r['ratio']:.2f}")
            lines.append(f"| {r['tokens']:,.0f} | {r['value']:.4f} | {base} | {ratio} |")
        lines.append("")
    return lines
