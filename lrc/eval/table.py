"""Render lrc-eval's results (the ``results.json`` dict) as Markdown, in the paper's layout.

For a hub suite the table has the paper's columns (Table 1: ARC-E ... MMLU, then "Avg."), the
paper's published rows for that suite (:mod:`lrc.eval.paper_results`, each naming its source
table) and our row last, so the gap shows at once. Scores are percentages with two decimals; a
cell without a value is ``-``. Our "Avg." is the mean of the suite's tasks, given only when every
one of them has a value (the paper's Avg. is the mean of all nine).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from lrc.eval.paper_results import paper_rows
from lrc.eval.suites import AVERAGED, suite_tasks

__all__ = ["render_markdown", "suite_average"]

DASH = "-"


def _pct(value: float | None) -> str:
    return DASH if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _num(value: float | None, digits: int = 4) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def suite_average(results: dict[str, Any]) -> float | None:
    """Mean of the suite's task scores (as fractions), or ``None`` unless every task has one."""
    specs = suite_tasks(results.get("suite"))
    values = [(results.get("tasks") or {}).get(s.task, {}).get("value") for s in specs]
    if not specs or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def render_markdown(results: dict[str, Any]) -> str:
    """The whole report: held-out metrics, the suite's table beside the paper's rows, other tasks."""
    lines = [f"# lrc-eval: {results.get('model', DASH)}", ""]
    if results.get("teacher"):
        lines += [f"Teacher: {results['teacher']}", ""]
    if results.get("heldout"):
        lines += _heldout_table(results["heldout"]) + [""]
    suite = results.get("suite")
    specs = suite_tasks(suite) if suite else ()
    if specs:
        lines += _suite_table(results, suite, specs) + [""]
    in_suite = {s.task for s in specs}
    others = {k: v for k, v in (results.get("tasks") or {}).items() if k not in in_suite}
    if others:
        lines += ["## Other tasks", "", _row(["Task", "Metric", "Score (%)", "Items", "Shots", "Scorer"]),
                  _row(["---"] * 6)]
        for name, r in others.items():
            n = r.get("n")
            lines.append(_row([name, str(r.get("metric", DASH)), _pct(_times100(r.get("value"))),
                               DASH if n is None else str(n), str(r.get("num_fewshot", 0)), str(r.get("scorer", DASH))]))
        lines.append("")
    return "\n".join(lines)


def _times100(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _heldout_table(h: dict[str, Any]) -> list[str]:
    lines = ["## Held-out text", "", _row(["Metric", "Student", "Teacher"]), _row(["---"] * 3),
             _row(["CE (nats/token)", _num(h.get("ce")), _num(h.get("teacher_ce"))]),
             _row(["Perplexity", _num(h.get("ppl"), 2), _num(h.get("teacher_ppl"), 2)])]
    if "kl" in h:
        lines += [_row(["KL(teacher ‖ student)", _num(h.get("kl")), DASH]),
                  _row(["Top-1 agreement", _num(h.get("top1_agreement")), DASH])]
    if h.get("tokens") is not None:
        lines += ["", f"{h['tokens']:,} held-out tokens scored."]
    return lines


def _suite_table(results: dict[str, Any], suite: str, specs: Sequence) -> list[str]:
    averaged = suite in AVERAGED
    shots = sorted({s.num_fewshot for s in specs})
    title = f"## Suite `{suite}` ({', '.join(f'{n}-shot' for n in shots)}; metric: " \
            + ", ".join(f"{s.column} {s.metric}" for s in specs) + ")"
    header = ["Model", "Tokens", "Source", *[s.column for s in specs]] + (["Avg."] if averaged else [])
    lines = [title, "", _row(header), _row(["---"] * len(header))]
    for row in paper_rows(suite):
        lines.append(_row([row.model, row.tokens, row.source, *[_pct(row.values.get(s.column)) for s in specs]]
                          + ([_pct(row.avg)] if averaged else [])))
    tasks = results.get("tasks") or {}
    ours = [_pct(_times100(tasks.get(s.task, {}).get("value"))) for s in specs]
    tokens = results.get("tokens_seen")
    name = f"**{results.get('name') or 'this model'}**"
    lines.append(_row([name, DASH if tokens is None else _tokens(tokens), "lrc-eval", *ours]
                      + ([_pct(_times100(suite_average(results)))] if averaged else [])))
    if not paper_rows(suite):
        lines += ["", f"The paper's values for the `{suite}` suite are not included here; only our row is shown."]
    return lines


def _tokens(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
