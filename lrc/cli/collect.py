"""``lrc-collect``: turn runs and sweeps into a table and figures.

    lrc-collect multirun/lrc/2025-01-01_12-00-00          # writes .../collected/
    lrc-collect runs/lrc multirun/lrc --out report --group-by student.rank --metric val/ce

Writes ``results.md`` and ``results.csv`` (mean ± std over seeds per variant) and PNG figures:
the validation metric against training tokens and against wall time per variant, and the final
metric per removed clone term when the variants switch terms off (``loss.term_weights.<t>=0``).
Failed or unfinished runs (and empty sweep job directories) are listed in ``results.md``, never an error.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Sequence

from lrc.analysis import collect as C
from lrc.analysis.efficiency import efficiency_markdown, token_efficiency

METRIC = re.compile(r"^val/[A-Za-z0-9_]+$")


def collect(paths: Sequence[str | Path], out: str | Path | None = None, group_by: Sequence[str] | None = None,
            metric: str = "val/ce", baseline: str | None = None) -> dict[str, Path]:
    """Collect the runs under ``paths`` into ``out`` (default ``<first path>/collected``); returns
    the written files by kind (``markdown``, ``csv``, ``tokens``, ``wall_time``, ``removed_terms``).
    With ``baseline`` (a variant's name), the report adds the tokens that variant needs to reach
    every other variant's curve (:mod:`lrc.analysis.efficiency`).
    Raises ``ValueError`` for bad arguments, before anything is written."""
    if not METRIC.match(metric):
        raise ValueError(f"--metric must be a validation metric such as val/ce or val/kl, got {metric!r}")
    runs = [C.load_run(d) for d in C.find_run_dirs(paths)]
    finished = [r for r in runs if r.status == "finished"]
    problems = [r for r in runs if r.status != "finished"]
    keys = [k.strip() for k in group_by if k.strip()] if group_by else None
    for k in keys or []:
        if finished and all(C.signature(r, [k])[k] == C.ABSENT for r in finished):
            raise ValueError(f"--group-by key {k!r} is in no run's config, overrides or metrics.json")
    out = Path(out) if out is not None else Path(paths[0]) / "collected"
    variants = C.group_variants(finished, keys)
    if baseline is not None and baseline not in [v.name for v in variants]:
        raise ValueError(f"--baseline {baseline!r} is not a variant here; the variants are: "
                         + ", ".join(repr(v.name) for v in variants))
    rows = C.summary_rows(variants)
    slug = metric.replace("/", "_")
    files = {"markdown": out / C.REPORT_FILE, "csv": out / "results.csv", "tokens": out / f"{slug}_vs_tokens.png",
             "wall_time": out / f"{slug}_vs_wall_time.png", "removed_terms": out / f"{slug}_by_removed_term.png"}
    out.mkdir(parents=True, exist_ok=True)
    for f in files.values():  # no figure left over from an earlier collection of other runs
        f.unlink(missing_ok=True)

    header, table = C.csv_table(rows)
    with files["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(table)

    figures, notes = draw_figures(variants, metric, files)
    report = C.markdown_report(rows, variants, problems, [(c, files[k].name) for k, c in figures], notes)
    if baseline is not None:
        base = next(v for v in variants if v.name == baseline)
        curves = {v.name: C.curve_series(v.runs, metric) for v in variants}
        tables = {name: token_efficiency(c, curves[baseline]) for name, c in curves.items() if name != base.name}
        report += "\n".join(efficiency_markdown(tables, baseline, metric)) + "\n"
    files["markdown"].write_text(report)
    return {k: f for k, f in files.items() if f.is_file()}


def draw_figures(variants: Sequence[C.Variant], metric: str, files: dict[str, Path]) -> tuple[list, list[str]]:
    """The curve figures (Figure 3 style) and the removed-term chart (Table 3 style) of the variants'
    (finished) runs; returns
    ``[(kind, caption)]`` of the figures drawn and notes on those that could not be."""
    from lrc.analysis.figures import plot_bars, plot_curves

    figures: list[tuple[str, str]] = []
    notes: list[str] = []
    for kind, x, label in (("tokens", "tokens_seen", "training tokens"), ("wall_time", "wall_s", "wall time (s)")):
        series = {v.name: C.curve_series(v.runs, metric, x) for v in variants}
        if any(s["x"] for s in series.values()):
            caption = f"{metric} against {label}"
            plot_curves(series, label, metric, files[kind], title=caption + " (mean ± std over seeds)")
            figures.append((kind, caption))
        else:
            notes.append(f"no {metric} curve against {label}: no finished run has a curves.csv with that metric")
    bars = C.removed_term_bars(variants, metric)
    if bars:
        caption = f"final {metric} per removed clone term"
        plot_bars(bars, f"final {metric}", files["removed_terms"], title=caption)
        figures.append(("removed_terms", caption))
    return figures, notes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lrc-collect", description="Tables (mean ± std over seeds) and figures from lrc-distill runs and sweeps."
    )
    parser.add_argument("paths", nargs="+", help="run directories, or directories holding runs (a sweep)")
    parser.add_argument("--out", default=None, help="output directory (default: <first path>/collected)")
    parser.add_argument("--group-by", default=None,
                        help="comma-separated config keys that define a variant, e.g. student.rank,loss.alpha "
                             "(default: every config difference except seeds)")
    parser.add_argument("--metric", default="val/ce", help="validation metric of the figures (default: val/ce)")
    parser.add_argument("--baseline", default=None,
                        help="a variant's name (as the table shows it, e.g. experiment=paper/fig3_kd): add the tokens "
                             "it needs to reach every other variant's metric after N tokens (token efficiency)")
    args = parser.parse_args(argv)
    try:
        files = collect(args.paths, args.out, args.group_by.split(",") if args.group_by else None, args.metric,
                        args.baseline)
    except ValueError as err:
        print(f"lrc-collect: error: {err}", file=sys.stderr)
        sys.exit(2)
    text = files["markdown"].read_text()
    print(text.split("\n## Figures")[0].split("\n## Variants")[0].rstrip())
    print(f"\nwrote {', '.join(str(f) for f in files.values())}")


if __name__ == "__main__":
    main()
