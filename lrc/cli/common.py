"""Shared bits of the command-line tools."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: The Hydra config tree (``conf/`` at the repository root); ``LRC_CONF_DIR`` overrides it.
CONF_DIR = Path(os.environ.get("LRC_CONF_DIR") or Path(__file__).resolve().parents[2] / "conf")


class ConfigError(ValueError):
    """A bad setting, reported as one clear message before any work or write."""


def print_summary(summary: dict[str, Any]) -> None:
    """One table with what a researcher looks at after a run."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lrc-distill summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    val, before = summary.get("val") or {}, summary.get("val_before") or {}

    def fmt(key: str, digits: int = 3) -> str:
        now = val.get(key)
        if now is None:
            return "-"
        start = before.get(key)
        return f"{now:.{digits}f}" + (f"  (before training {start:.{digits}f})" if start is not None else "")

    rows = [
        ("tokens seen", f"{summary['tokens_seen']:,} in {summary['steps']} steps"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("throughput", f"{summary['tokens_per_s']:.0f} tokens/s"),
        ("held-out CE student", fmt("ce")),
        ("held-out CE teacher", fmt("teacher_ce")),
        ("top-1 agreement", fmt("top1_agreement")),
        ("KL(teacher || student)", fmt("kl")),
        ("run directory", summary["run_dir"]),
        ("exported student", summary.get("export_dir", "-")),
    ]
    if summary.get("tokens_per_source"):
        rows.insert(1, ("tokens per source", ", ".join(f"{k}: {v:,}" for k, v in summary["tokens_per_source"].items())))
    if "answer" in summary:
        rows.append((f"student: {summary['prompt']}", repr(summary["answer"])))
    for k, v in rows:
        table.add_row(k, str(v))
    Console(width=120).print(table)
