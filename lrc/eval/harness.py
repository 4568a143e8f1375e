"""The lm-evaluation-harness adapter (``lm-eval``, the optional extra ``pip install 'lrc[eval]'``).

* :func:`available` says whether lm-eval is installed, without importing it;
* :func:`mc_task_config` writes an lrc multiple-choice file (:mod:`lrc.eval.mc`) as an lm-eval
  custom task (``dataset_path: json`` with ``data_files``), so local tasks run through lm-eval's
  own API, offline;
* :func:`check_tasks` refuses unknown task names before any model is loaded;
* :func:`run_tasks` evaluates an already loaded transformers model and tokenizer (lm-eval's
  ``HFLM``) and returns lm-eval's per-task results.

Hub tasks (the ``paper``, ``safety`` and ``fewshot`` suites) download their data sets through
``datasets`` on first use; ``HF_DATASETS_OFFLINE=1`` with a warm cache runs them offline.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any, Sequence

__all__ = ["INSTALL_HINT", "PIN", "available", "check_tasks", "mc_task_config", "run_tasks", "version"]

PIN = "lm-eval==0.4.13"
INSTALL_HINT = f"install the eval extra: pip install -c constraints.txt -e '.[eval]' (or pip install '{PIN}')"


def available() -> bool:
    """True when ``lm_eval`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("lm_eval") is not None


def version() -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lm_eval")
    except PackageNotFoundError:
        return None


def mc_task_config(name: str, data_file: str | Path, folder: str | Path) -> Path:
    """Write ``<folder>/<name>.yaml``: an lm-eval multiple-choice task reading the JSON(L) file of
    lrc items (``context``, ``choices``, ``gold``), scored with ``acc`` and ``acc_norm``."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(Path(data_file).resolve()))}",
        "output_type: multiple_choice",
        "test_split: test",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: " "',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def task_manager(include_path: Sequence[str | Path] = (), include_defaults: bool = True) -> Any:
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path]
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def check_tasks(names: Sequence[str], manager: Any) -> None:
    """``ValueError`` for the first name lm-eval does not know (task, group or tag), with the closest."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown lm-eval task {name!r}{hint}; lm-eval's list: python -m lm_eval ls tasks")


def run_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], manager: Any, num_fewshot: int | None = None,
              batch_size: int = 8, limit: int | float | None = None, device: str | None = None,
              apply_chat_template: bool = False, seed: int = 0, samples: bool = False) -> Any:
    """lm-eval's ``results`` (task or group -> ``{"acc,none": ..., ...}``) for ``tasks`` at
    ``num_fewshot`` shots (``None``: each task's own default) on a loaded model; with ``samples``,
    ``(results, per-item samples by task)``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=device or str(next(model.parameters()).device))
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, task_manager=manager, limit=limit,
        bootstrap_iters=0, log_samples=samples, apply_chat_template=apply_chat_template,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    results = dict(out["results"]) if out else {}
    return (results, dict(out.get("samples") or {})) if samples else results
