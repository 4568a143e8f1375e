"""From run directories to a comparison: find runs, group them into variants, mean ± std over seeds.

Plain functions over plain data (no Lightning, no torch), used by ``lrc-collect``:

- :func:`find_run_dirs` / :func:`load_run`: a run directory holds ``config.yaml``, ``metrics.json``
  or ``error.txt``; its status is ``finished``, ``interrupted``, ``failed`` or ``unfinished``.
- :func:`group_variants`: runs that differ only in seed form one variant.
- :func:`mean_std`, :func:`summary_rows`: the table, one row per variant.
- :func:`curve_series`, :func:`removed_term_bars`: the data behind the figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from lrc.analysis.curves import CURVES_FILE, read_curves, validation_points

RUN_FILES = ("config.yaml", "metrics.json", "error.txt")
REPORT_FILE = "results.md"  # marks an lrc-collect output directory
#: The clone terms in the paper's order (Table 3); their weights live in ``loss.term_weights``.
TERMS = ("q", "k", "v", "o", "gate", "up", "down")
TERM_PREFIX = "loss.term_weights."
#: Table columns: (name, label, digits, where in metrics.json; the first path present wins).
COLUMNS: tuple[tuple[str, str, int, tuple[tuple[str, ...], ...]], ...] = (
    ("val_ce", "final val CE", 4, (("val", "ce"),)),
    ("best_val_ce", "best val CE", 4, (("val_best", "ce"),)),
    ("teacher_ce", "teacher CE", 4, (("val", "teacher_ce"),)),
    ("top1_agreement", "top-1 agreement", 4, (("val", "top1_agreement"),)),
    ("kl", "KL", 4, (("val", "kl"),)),
    ("tokens", "tokens", 0, (("tokens_seen",),)),
    ("wall_s", "wall time (s)", 1, (("wall_time_total_s",), ("wall_time_s",))),
    ("trainable_params", "trainable params", 0, (("params", "trainable"),)),
    ("deployed_params", "deployed params", 0, (("params", "deployed"),)),
)


@dataclass
class Run:
    """One run directory as read from disk."""

    path: Path
    status: str  # finished | interrupted | failed | unfinished
    reason: str = ""  # why it is not finished
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        return self.metrics.get("seed", self.config.get("seed"))


@dataclass
class Variant:
    """Runs that differ only in seed."""

    name: str
    key: tuple
    runs: list[Run]


# ------------------------------------------------------------------------------ discovery
def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every directory under ``paths`` (each a run or a tree of runs) that holds one of
    :data:`RUN_FILES`, plus every job directory of a Hydra sweep (a sub-directory beside
    ``multirun.yaml``) that is empty: a job that died before writing anything. A run's own
    sub-directories, hidden directories and ``lrc-collect`` outputs are not searched.
    Raises ``ValueError`` for a path that does not exist or holds no run."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ValueError(f"{p} is not a directory")
        runs = list(_walk(p))
        if not runs:
            raise ValueError(f"{p} holds no run directory (one with {', '.join(RUN_FILES)})")
        found += [r for r in runs if r not in found]
    return found


def _walk(d: Path, sweep_job: bool = False) -> Iterable[Path]:
    if any((d / f).is_file() for f in RUN_FILES):
        yield d
        return
    if (d / REPORT_FILE).is_file():
        return
    if sweep_job and not any(d.iterdir()):
        yield d
        return
    for sub in sorted(x for x in d.iterdir() if x.is_dir() and not x.name.startswith(".")):
        yield from _walk(sub, sweep_job=(d / "multirun.yaml").is_file())


def load_run(path: Path) -> Run:
    """Read a run directory; never raises for a broken run (it comes back ``failed``). An
    ``error.txt`` older than ``metrics.json`` (a failed attempt, then a successful resume) is ignored."""
    run = Run(path=path, status="finished")
    config_file, metrics_file, error_file = (path / f for f in RUN_FILES)
    try:
        if config_file.is_file():
            run.config = yaml.safe_load(config_file.read_text()) or {}
        if metrics_file.is_file():
            run.metrics = json.loads(metrics_file.read_text())
        if not isinstance(run.config, dict) or not isinstance(run.metrics, dict):
            raise ValueError("config.yaml and metrics.json must each hold a mapping")
    except (OSError, ValueError, yaml.YAMLError) as err:  # JSONDecodeError is a ValueError
        run.config, run.metrics = {}, {}
        run.status, run.reason = "failed", f"unreadable: {(str(err).splitlines() or [type(err).__name__])[0]}"
        return run
    run.overrides = [str(o) for o in run.metrics.get("overrides") or []]
    status = run.metrics.get("status") or ("interrupted" if run.metrics.get("interrupted") else "finished")
    stale_error = (metrics_file.is_file() and error_file.is_file()
                   and metrics_file.stat().st_mtime > error_file.stat().st_mtime)
    if error_file.is_file() and not stale_error:
        lines = [ln.strip() for ln in error_file.read_text(errors="replace").splitlines() if ln.strip()]
        message = next((ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")), None)
        run.status, run.reason = "failed", (message or (lines[-1] if lines else "empty error.txt"))[:300]
    elif not config_file.is_file() and not metrics_file.is_file():
        run.status, run.reason = "unfinished", "nothing written: the job failed early or is still running"
    elif not metrics_file.is_file():
        run.status, run.reason = "unfinished", "no metrics.json"
    elif status == "failed":
        run.status, run.reason = "failed", str(run.metrics.get("error") or "status failed")[:300]
    elif status == "interrupted":
        run.status, run.reason = "interrupted", f"interrupted at step {run.metrics.get('steps', '?')}"
    elif status != "finished":
        run.status, run.reason = "unfinished", f"status {status!r}"
    return run


# ------------------------------------------------------------------------------- grouping
def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become JSON text so that values compare and hash."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
    return out


def ignored(key: str) -> bool:
    """Keys that never make a variant: every ``seed``, where things are written, Hydra's own."""
    key = key.lstrip("+~")
    return key.split(".")[-1] == "seed" or key.startswith(("paths.", "hydra.")) or key == "ckpt_path"


def parse_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def signature(run: Run, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """What identifies a run's variant: its resolved config (or, without ``config.yaml``, its
    overrides) flattened, minus :func:`ignored` keys and values naming the run's own directory.
    With ``keys``, only those keys (``method`` is read from ``metrics.json``)."""
    if run.config:
        flat = flatten(run.config)
        own = flat.get("paths.output_dir")
        flat = {k: v for k, v in flat.items() if not (own and isinstance(v, str) and str(own) in v)}
    else:
        flat = dict(parse_override(o) for o in run.overrides)
    if "method" in run.metrics:
        flat.setdefault("method", run.metrics["method"])
    if keys is not None:
        return {k: flat.get(k, ABSENT) for k in keys}
    return {k: v for k, v in flat.items() if not ignored(k)}


ABSENT = "<absent>"


def group_variants(runs: Sequence[Run], keys: Sequence[str] | None = None) -> list[Variant]:
    """Group (finished) runs into variants, in order of first appearance. By default every config
    difference except seeds separates variants; with ``keys`` only those keys do. A variant is named
    by its first run's overrides less seeds and less those every run has (``default`` when none
    are left), or, for runs without recorded overrides or with ``keys``, by its config values."""
    sigs = [signature(r, keys) for r in runs]
    all_keys = sorted(set().union(*sigs)) if sigs else []
    differing = [k for k in all_keys if len({_hashable(s.get(k, ABSENT)) for s in sigs}) > 1]
    if keys is not None:
        differing = list(keys)
    groups: dict[tuple, list[Run]] = {}
    for run, sig in zip(runs, sigs):
        groups.setdefault(tuple((k, _hashable(sig.get(k, ABSENT))) for k in differing), []).append(run)
    common = set.intersection(*(set(_kept_overrides(r)) for r in runs)) if runs else set()
    variants = []
    for key, members in groups.items():
        by_config = " ".join(f"{k}={v}" for k, v in key)
        if keys is None and any(r.overrides for r in runs):
            name = " ".join(o for o in _kept_overrides(members[0]) if o not in common)
        else:
            name = by_config
        variants.append(Variant(name=name or "default", key=key, runs=members))
    names = [v.name for v in variants]
    for v in variants:  # two variants whose overrides read alike: name them by config instead
        if names.count(v.name) > 1:
            v.name = " ".join(f"{k}={val}" for k, val in v.key) or v.name
    return variants


def _kept_overrides(run: Run) -> list[str]:
    return [o for o in run.overrides if not ignored(parse_override(o)[0])]


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


# ------------------------------------------------------------------------------ statistics
def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (ddof=1) and count of the finite values; the std is
    ``None`` below two values, the mean ``None`` without any."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return None, None, 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return mean, std, n


def lookup(metrics: Mapping[str, Any], paths: Sequence[Sequence[str]]) -> float | None:
    """The first of ``paths`` (key sequences into ``metrics``) that holds a number."""
    for path in paths:
        node: Any = metrics
        for k in path:
            node = node.get(k) if isinstance(node, Mapping) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return float(node)
    return None


def metric_path(metric: str) -> tuple[str, ...]:
    """``val/ce`` -> ``("val", "ce")``: where a final value sits in ``metrics.json``."""
    return tuple(metric.split("/"))


def summary_rows(variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """One row per variant: ``variant``, ``n`` (runs), ``seeds``, and ``<column>_mean`` /
    ``<column>_std`` over its runs for each of :data:`COLUMNS`."""
    rows = []
    for v in variants:
        row: dict[str, Any] = {"variant": v.name, "n": len(v.runs), "seeds": " ".join(str(r.seed) for r in v.runs)}
        for name, _, _, paths in COLUMNS:
            mean, std, _ = mean_std(lookup(r.metrics, paths) for r in v.runs)
            row[f"{name}_mean"], row[f"{name}_std"] = mean, std
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------- figures
def curve_series(runs: Sequence[Run], metric: str = "val/ce", x: str = "tokens_seen") -> dict[str, list]:
    """One variant's validation curve: at every token count that all its runs validated at,
    ``x`` (mean over runs of ``tokens_seen`` or ``wall_s``), ``mean`` and ``std`` (sample, ``None``
    for a single run) of ``metric``. Empty lists when a run has no ``curves.csv``."""
    per_run = []
    for r in runs:
        f = r.path / CURVES_FILE
        if not f.is_file():
            return {"x": [], "mean": [], "std": []}
        per_run.append({p["tokens_seen"]: p for p in validation_points(read_curves(f), metric)})
    common = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    out: dict[str, list] = {"x": [], "mean": [], "std": []}
    for t in common:
        xs = [p[t].get(x) for p in per_run]
        if any(v is None for v in xs):
            continue
        mean, std, _ = mean_std(p[t][metric] for p in per_run)
        if mean is None:
            continue
        out["x"].append(sum(xs) / len(xs))
        out["mean"].append(mean)
        out["std"].append(std)
    return out


def removed_terms(run: Run) -> tuple[str, ...]:
    """The clone terms a run switched off (``loss.term_weights.<term>`` = 0), in :data:`TERMS` order;
    from the resolved config, else from the overrides."""
    weights = (run.config.get("loss") or {}).get("term_weights") if run.config else None
    if not isinstance(weights, Mapping):
        weights = {}
        for o in run.overrides:
            key, value = parse_override(o)
            if key.startswith(TERM_PREFIX):
                weights[key[len(TERM_PREFIX):]] = value
    off = {t for t, w in weights.items() if _is_zero(w)}
    return tuple(t for t in TERMS if t in off) + tuple(sorted(off - set(TERMS)))


def _is_zero(w: Any) -> bool:
    try:
        return float(w) == 0.0
    except (TypeError, ValueError):
        return False


def removed_term_bars(variants: Sequence[Variant], metric: str = "val/ce") -> list[dict[str, Any]]:
    """Bars for the removed-term chart (Table 3): one per variant, labelled ``all terms`` or
    ``w/o <terms>``, with the mean, std and n of the final ``metric``; empty unless the variants
    differ in which terms they switch off."""
    bars = []
    for v in variants:
        off = removed_terms(v.runs[0])
        mean, std, n = mean_std(lookup(r.metrics, [metric_path(metric)]) for r in v.runs)
        if mean is None:
            continue
        label = "w/o " + "+".join(off) if off else "all terms"
        bars.append({"label": label, "variant": v.name, "removed": off, "mean": mean, "std": std, "n": n})
    if len({b["removed"] for b in bars}) < 2:
        return []
    bars.sort(key=lambda b: (len(b["removed"]) > 0, [TERMS.index(t) if t in TERMS else len(TERMS)
                                                     for t in b["removed"]]))  # all terms, then q, k, ...
    labels = [b["label"] for b in bars]
    for b in bars:
        if labels.count(b["label"]) > 1:
            b["label"] = f"{b['label']} ({b['variant']})"
    return bars


# --------------------------------------------------------------------------------- output
def csv_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows of the CSV table: full-precision numbers, an empty cell for a missing
    value or the std of a single run."""
    header = ["variant", "n", "seeds"] + [f"{c[0]}_{s}" for c in COLUMNS for s in ("mean", "std")]
    return header, [{k: ("" if row.get(k) is None else row[k]) for k in header} for row in rows]


def format_mean_std(mean: float | None, std: float | None, digits: int) -> str:
    """``5.1234 ± 0.0100``; ``-`` for a missing std (a single run) or mean."""
    if mean is None:
        return "-"
    spec = f",.{digits}f"
    return f"{mean:{spec}} ± {'-' if std is None else format(std, spec)}"


def markdown_report(rows: Sequence[Mapping[str, Any]], variants: Sequence[Variant], problems: Sequence[Run],
                    figures: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> str:
    """The Markdown summary: the table (mean ± sample std over seeds), the figures
    (``(caption, file name)``), the variants' run directories and the failed or unfinished runs."""
    n_runs = sum(len(v.runs) for v in variants)
    lines = [f"# lrc-collect: {n_runs} finished runs in {len(variants)} variants, {len(problems)} failed or unfinished",
             "", "Mean ± sample standard deviation (ddof=1) over the runs (seeds) of each variant; "
             "`-` where a variant has a single run.", ""]
    head = ["variant", "n"] + [c[1] for c in COLUMNS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row['variant']}`", str(row["n"])]
        cells += [format_mean_std(row[f"{c[0]}_mean"], row[f"{c[0]}_std"], c[2]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| (no finished run) |" + " |" * (len(head) - 1))
    if figures or notes:
        lines += ["", "## Figures", ""]
        lines += [f"![{caption}]({name})\n" for caption, name in figures]
        lines += [f"- {n}" for n in notes]
    lines += ["", "## Variants", ""]
    for v in variants:
        lines.append(f"- `{v.name}`: " + ", ".join(f"{r.path} (seed {r.seed})" for r in v.runs))
    lines += ["", "## Failed or unfinished", ""]
    lines += [f"- {r.path}: {r.status} ({r.reason})" for r in problems] or ["none"]
    return "\n".join(lines) + "\n"
