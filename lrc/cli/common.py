"""Shared bits of the command-line tools."""

from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

#: The Hydra config tree (``conf/`` at the repository root); ``LRC_CONF_DIR`` overrides it.
CONF_DIR = Path(os.environ.get("LRC_CONF_DIR") or Path(__file__).resolve().parents[2] / "conf")


class ConfigError(ValueError):
    """A bad setting, reported as one clear message before any work or write."""


#: Errors that are the user's input or environment: one line, exit status 2, no traceback.
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def run_command(command: str, run: Callable[[Any], Any], cfg: Any) -> Any:
    """``run(cfg)`` for the command-line tool ``command``: a user error (:data:`USER_ERRORS`)
    prints ``<command>: error: ...`` and exits with status 2 (with ``LRC_DEBUG`` set it is raised,
    traceback and all); anything else propagates."""
    try:
        return run(cfg)
    except USER_ERRORS as err:
        if os.environ.get("LRC_DEBUG"):
            raise
        print(f"{command}: error: {err}", file=sys.stderr)
        sys.exit(2)


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


#: Environment variables that give a process's rank in a multi-process run (as Lightning reads them).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
#: The run-directory lock of every lrc command (one name, so that two commands exclude each other too).
LOCK_FILE = ".lrc-distill.lock"


def is_rank_zero() -> bool:
    """True in a single-process run and in rank 0 of a multi-process one."""
    return all(int(os.environ.get(k) or 0) == 0 for k in RANK_VARIABLES)


@contextmanager
def lock_run_dir(out: Path, command: str = "lrc-distill") -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (``fcntl.flock`` on ``out/.lrc-distill.lock``, which records
    the holder's pid and host) for the block. A second run of ``command`` aimed at the same
    directory fails at once with :class:`ConfigError` (naming ``command``, e.g. ``lrc-sft``). Only
    rank 0 of a multi-process run locks; the lock goes with
    the process, so a killed run leaves nothing to clean up. The directory is created here, and a
    path that is a file or cannot be written is reported in one line."""
    if not is_rank_zero():
        yield
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} is a file, not a directory; choose another one (hydra.run.dir=...)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / LOCK_FILE, "a+")
    except OSError as err:
        raise ConfigError(f"cannot write to the output directory {out}: {err.strerror or err}") from None
    with fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not a POSIX system: no locking
            pass
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise ConfigError(
                f"output directory {out} is in use by another {command} run ({holder}); wait for it to end "
                f"or choose another directory (hydra.run.dir=...)"
            ) from None
        if not os.access(out, os.W_OK):
            raise ConfigError(f"cannot write to the output directory {out}: permission denied")
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield
