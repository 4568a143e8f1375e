"""Hydra callbacks of lrc-distill (``hydra.callbacks`` in ``conf/distill.yaml``).

* Before Hydra creates the run or sweep directory: a path that is a file, or that cannot be
  created, is reported in one line instead of Hydra's traceback.
* After a sweep (``-m``): one line per job, finished or failed, read from the job directories
  (``metrics.json`` / ``error.txt``), so it works with any launcher; the exit status is 1 when a
  job failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

ERROR_FILE = "error.txt"  # written by lrc-distill into a sweep job's directory when the job fails


class LrcHydraCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_dir(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_dir(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        jobs = sweep_jobs(sweep)
        failed = [j for j in jobs if j["status"] == "failed"]
        print(f"lrc-distill sweep: {len(jobs) - len(failed)} of {len(jobs)} job(s) finished, {len(failed)} failed ({sweep})",
              file=sys.stderr)
        for j in jobs:
            detail = f": {j['error']}" if j["status"] == "failed" else ""
            print(f"  {j['job']:>4}  {j['status']:<11} {' '.join(j['overrides'])}{detail}", file=sys.stderr)
        if failed:
            sys.exit(1)


def sweep_jobs(sweep: Path) -> list[dict[str, Any]]:
    """``job`` (directory name), ``status`` (finished | interrupted | failed), ``overrides`` and, for
    failed jobs, the first line of the ``error``, for every job directory of ``sweep``."""
    jobs = []
    for d in sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        error, metrics = d / ERROR_FILE, d / "metrics.json"
        if error.is_file():
            text = error.read_text().splitlines()
            overrides = text[0].removeprefix("overrides:").split() if text else []
            message = next((line.removeprefix("error: ") for line in text if line.startswith("error: ")), "")
            jobs.append({"job": d.name, "status": "failed", "overrides": overrides, "error": message})
        elif metrics.is_file():
            summary = json.loads(metrics.read_text())
            status = "interrupted" if summary.get("interrupted") else "finished"
            jobs.append({"job": d.name, "status": status, "overrides": summary.get("overrides") or []})
    return jobs


def write_job_error(job_dir: Path, overrides: list[str], err: BaseException, details: str = "") -> Path | None:
    """``error.txt`` in a failed sweep job's directory: its overrides, the error and ``details``
    (a traceback for an unexpected error). Returns ``None`` when the directory cannot be written."""
    from lrc.io import atomic_write

    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(job_dir / ERROR_FILE, "w") as fh:
            fh.write(f"overrides: {' '.join(overrides)}\nerror: {' '.join(str(err).split())}\n{details}")
    except OSError:
        return None
    return job_dir / ERROR_FILE


def _check_dir(path: Any) -> None:
    """Create ``path`` the way Hydra would, but report a failure in one line (exit status 2)."""
    path = Path(str(path))
    if path.exists() and not path.is_dir():
        _fail(f"output path {path} is a file, not a directory; choose another one (hydra.run.dir=...)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _fail(f"cannot create the output directory {path}: {err.strerror or err}")


def _fail(message: str) -> None:
    print(f"lrc-distill: error: {message}", file=sys.stderr)
    sys.exit(2)
