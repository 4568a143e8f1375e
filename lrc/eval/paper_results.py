"""The paper's published rows (Hao et al. 2025, arXiv 2505.12781), by suite, each with its source table.

Values are percentages as the paper prints them. A cell the paper does not give is absent (the
table shows ``-``); nothing here is derived or estimated. Table 1 gives per-task scores for
LRC-1.5B only; the other rows carry the paper's "Avg." (the mean of the nine tasks of the
``paper`` suite). The paper's safety and few-shot values are not included: those suites' tables
show our row alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PAPER_ROWS", "PaperRow", "paper_rows"]


@dataclass(frozen=True)
class PaperRow:
    model: str
    tokens: str  # training tokens as the paper states them
    source: str  # the paper's table the row comes from
    values: dict[str, float] = field(default_factory=dict)  # column (suites.TaskSpec.column) -> %
    avg: float | None = None  # the paper's "Avg."


_T1 = "Table 1 (zero-shot, after SFT)"
_T2 = "Table 2 (zero-shot, after SFT)"
_T15 = "Table 15 (zero-shot, before SFT)"

PAPER_ROWS: dict[str, tuple[PaperRow, ...]] = {
    "paper": (
        PaperRow("LRC-1.7B", "20B", _T1, avg=64.98),
        PaperRow("Qwen3-1.7B", "36T", _T1, avg=63.17),
        PaperRow("LRC-1.5B", "10B", _T1, {
            "ARC-E": 74.75, "ARC-C": 44.97, "LogiQA": 30.72, "CSQA": 65.77, "PIQA": 73.07,
            "WinoG": 62.25, "BoolQ": 75.78, "SciQ": 94.60, "MMLU": 49.42,
        }, avg=63.48),
        PaperRow("InternLM2-1.8B", "2T", _T1, avg=62.60),
        PaperRow("SmolLM2-1.7B", "11T", _T1, avg=60.50),
        PaperRow("MiniCPM-1.2B", "1T", _T1, avg=60.42),
        PaperRow("LRC-4B", "18B", _T2, avg=70.30),
        PaperRow("Qwen3-4B", "36T", _T2, avg=70.29),
        PaperRow("Gemma3-4B", "-", _T2, avg=69.43),
        PaperRow("Minitron-4B", "94B", _T2, avg=68.31),
        PaperRow("LRC-1.5B-B", "10B", _T15, avg=62.48),
        PaperRow("LRC-1.7B-B", "20B", _T15, avg=63.43),
        PaperRow("LRC-4B-B", "18B", _T15, avg=70.26),
    ),
    "safety": (),
    "fewshot": (),
    "offline": (),
}


def paper_rows(suite: str) -> tuple[PaperRow, ...]:
    """The paper's rows for ``suite`` (none for a suite the paper's values are not given for)."""
    return PAPER_ROWS.get(suite, ())
