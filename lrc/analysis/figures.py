"""PNG figures for ``lrc-collect`` (matplotlib, Agg: no display needed).

Figures are built on :class:`matplotlib.figure.Figure` directly, without ``pyplot``, so nothing
depends on (or changes) a global backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_curves(series: Mapping[str, Mapping[str, list]], xlabel: str, ylabel: str, path: str | Path,
                title: str = "") -> Path:
    """One line per variant (``series[name]`` has ``x``, ``mean`` and ``std`` lists), with a ±1 std
    band where the std is known (more than one seed)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, s in series.items():
        if not s["x"]:
            continue
        (line,) = ax.plot(s["x"], s["mean"], marker="o", markersize=3, label=name)
        if all(v is not None for v in s["std"]) and len(s["x"]) > 0:
            lo = [m - d for m, d in zip(s["mean"], s["std"])]
            hi = [m + d for m, d in zip(s["mean"], s["std"])]
            ax.fill_between(s["x"], lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, Path(path))


def plot_bars(bars: Sequence[Mapping[str, Any]], ylabel: str, path: str | Path, title: str = "") -> Path:
    """One bar per entry (``label``, ``mean``, ``std``), std as an error bar where known, the value
    written above each bar."""
    fig = Figure(figsize=(max(5.0, 1.0 + 0.9 * len(bars)), 4.5))
    ax = fig.add_subplot()
    xs = range(len(bars))
    means = [b["mean"] for b in bars]
    errs = [b["std"] or 0.0 for b in bars]
    ax.bar(xs, means, yerr=errs, capsize=4, color=["0.55" if not b.get("removed") else "C0" for b in bars])
    for x, m in zip(xs, means):
        ax.annotate(f"{m:.3f}", (x, m), ha="center", va="bottom", fontsize="small",
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(list(xs), [b["label"] for b in bars], rotation=30, ha="right")
    lo, hi = min(m - e for m, e in zip(means, errs)), max(m + e for m, e in zip(means, errs))
    pad = (hi - lo) * 0.3 or abs(hi) * 0.05 or 1.0
    ax.set_ylim(lo - pad, hi + pad)  # differences between terms are small next to the CE itself
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))
