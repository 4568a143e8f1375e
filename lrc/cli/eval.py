"""``lrc-eval``: evaluate a model and set it beside the paper (Hydra config ``conf/eval.yaml``).

    lrc-eval model=runs/lrc/<run>/student                   # offline: held-out CE/ppl, KL, agreement, pydoc_mc
    lrc-eval model=runs/sft/<run>/model suite=paper         # the paper's nine zero-shot tasks (lm-eval, hub)
    lrc-eval model=<dir> suite=null mc_files=[my_task.jsonl]

Everything that can be checked before a model is loaded is: unknown keys, the model directory,
the suite and task names, a missing lm-eval for tasks that need it, the local task files; the
teacher's tokenizer is compared with the model's before any evaluation. It writes
``results.json`` (atomically) and ``results.md`` (:func:`lrc.eval.table.render_markdown`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lrc.cli.common import CONF_DIR, ConfigError, run_command

DTYPES = ("float32", "bfloat16", "float16")
SCORERS = ("auto", "lm_eval", "lrc")


# ----------------------------------------------------------------------------- checks
def check_settings(cfg: DictConfig) -> None:
    """The settings alone: known keys and kinds, a model, a known suite / scorer / dtype, lm-eval
    installed when something needs it, local task files that exist and parse."""
    from lrc.cli.checks import check_config
    from lrc.eval import harness
    from lrc.eval.mc import read_mc_file
    from lrc.eval.suites import HUB_SUITES, suite_tasks

    check_config(cfg, CONF_DIR, "eval")
    if not cfg.model:
        raise ConfigError("model is required: a model directory (lrc-distill's student/, lrc-sft's model/) or a hub id")
    try:
        suite_tasks(cfg.suite)
    except ValueError as err:
        raise ConfigError(f"suite: {err}") from None
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if cfg.scorer not in SCORERS:
        raise ConfigError(f"scorer must be one of {SCORERS}, got {cfg.scorer!r}")
    for key in ("batch_size", "pydoc_max_items"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg.include_path is not None and not Path(str(cfg.include_path)).is_dir():
        raise ConfigError(f"include_path={cfg.include_path!r} is not a directory of lm-eval task YAMLs")
    needs = [f"suite={cfg.suite}"] if cfg.suite in HUB_SUITES else []
    needs += [f"tasks={list(cfg.tasks)}"] if cfg.tasks else []
    needs += ["scorer=lm_eval"] if cfg.scorer == "lm_eval" else []
    if needs and not harness.available():
        raise ConfigError(f"{' and '.join(needs)} needs lm-evaluation-harness, which is not installed; "
                          f"{harness.INSTALL_HINT}")
    names = set()
    for f in cfg.mc_files:
        try:
            read_mc_file(f)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"mc_files: {err}") from None
        name = Path(f).stem
        if name in names or (name == "pydoc_mc" and cfg.suite == "offline"):
            raise ConfigError(f"mc_files: two local tasks are named {name!r} (a task is named after its file's stem)")
        names.add(name)
    check_device(str(cfg.device))


def check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but torch sees no CUDA GPU on this machine; use device=cpu")


def resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def check_model_source(source: str) -> None:
    """A local-looking ``model`` must be a model directory (``config.json``)."""
    local = os.path.sep in source or source.startswith((".", "~")) or Path(source).exists()
    if local and not (Path(source).expanduser() / "config.json").is_file():
        raise ConfigError(f"model={source!r}: no model directory there (no config.json)")


def find_run(model: str, depth: int = 2) -> dict[str, Any] | None:
    """The ``config.yaml`` (and ``metrics.json``) of the lrc-distill run that exported ``model``:
    the directory above it; an lrc-sft run there is followed to the model it fine-tuned."""
    run_dir = Path(model).expanduser().resolve().parent
    config = run_dir / "config.yaml"
    if depth == 0 or not config.is_file():
        return None
    run = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
    if isinstance(run.get("teacher"), dict):
        metrics = run_dir / "metrics.json"
        run["metrics"] = json.loads(metrics.read_text()) if metrics.is_file() else {}
        return run
    source = (run.get("model") or {}).get("source") if isinstance(run.get("model"), dict) else None
    return find_run(str(source), depth - 1) if source and Path(str(source)).expanduser().is_dir() else None


def teacher_settings(cfg: DictConfig, run: dict[str, Any] | None) -> dict[str, Any] | None:
    """``load_teacher`` keywords, or ``None`` for no teacher (``teacher.source=null``, or ``auto``
    without an lrc-distill run above the model)."""
    t = OmegaConf.to_container(cfg.teacher, resolve=True) if cfg.get("teacher") is not None else None
    if t is None or t.get("source") is None:
        return None
    if t["source"] == "auto":
        if run is None:
            return None
        found = run["teacher"]
        t = {**t, "source": found["source"], "tiny": found.get("tiny")}
        if found.get("cache_dir") and "${" not in str(found["cache_dir"]):
            t["cache_dir"] = found["cache_dir"]
    return t


def check_same_tokenizer(student_tok: Any, teacher_tok: Any, model: str, teacher: str) -> None:
    """Held-out KL and agreement compare the two models token by token: one vocabulary."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        diff = sorted(set(s.items()) ^ set(t.items()))[:3]
        raise ConfigError(
            f"the tokenizers of model={model!r} ({len(s)} tokens) and teacher {teacher!r} ({len(t)} tokens) differ "
            f"(e.g. {diff}); the held-out KL and agreement need one tokenizer: set teacher.source to the model's "
            f"teacher, or teacher.source=null"
        )


# -------------------------------------------------------------------------------- run
def run(cfg: DictConfig) -> dict[str, Any]:
    """The whole evaluation; returns the results dict (also written to ``results.json``)."""
    if cfg.get("model"):  # the cheapest check first: no library is imported for it
        check_model_source(str(cfg.model))
    check_settings(cfg)
    with tempfile.TemporaryDirectory(prefix="lrc-eval-tasks-") as tmp:
        return _run(cfg, Path(tmp))


def _run(cfg: DictConfig, tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrc.cli.distill import instantiate_checked
    from lrc.eval import harness
    from lrc.eval.mc import read_mc_file, write_mc_file
    from lrc.eval.pydoc_mc import TASK_NAME, build_pydoc_items
    from lrc.eval.suites import suite_tasks
    from lrc.io import atomic_write
    from lrc.teachers import load_teacher

    out = Path(cfg.paths.output_dir)
    model_src = str(cfg.model)
    offline = cfg.suite == "offline"
    specs = suite_tasks(cfg.suite)
    use_lm_eval = cfg.scorer == "lm_eval" or (cfg.scorer == "auto" and harness.available())

    # local multiple-choice tasks: name -> file (the embedded one is written to the run directory)
    local = {Path(f).stem: Path(f) for f in cfg.mc_files}
    if offline:  # written beside the results at the end (nothing is written before every check passed)
        local = {TASK_NAME: write_mc_file(build_pydoc_items(int(cfg.pydoc_max_items), int(cfg.seed)),
                                          tmp / f"{TASK_NAME}.jsonl"), **local}
    manager = None
    hub_names = [s.task for s in specs] + list(cfg.tasks)
    if hub_names or (local and use_lm_eval):
        for name, path in local.items():
            harness.mc_task_config(name, path, tmp)
        include = [tmp] + ([str(cfg.include_path)] if cfg.include_path else [])
        manager = harness.task_manager(include, include_defaults=bool(hub_names))
        try:
            harness.check_tasks(hub_names, manager)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    run_info = find_run(model_src) if Path(model_src).expanduser().is_dir() else None
    teacher_kw = teacher_settings(cfg, run_info) if offline else None
    device = resolve_device(str(cfg.device))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_src)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model={model_src!r}: its tokenizer cannot be loaded: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher = None
    if teacher_kw is not None:
        teacher, teacher_tok = load_teacher(**teacher_kw, device=device)
        check_same_tokenizer(tokenizer, teacher_tok, model_src, teacher_kw["source"])
    model = AutoModelForCausalLM.from_pretrained(model_src, dtype=getattr(torch, cfg.dtype)).to(device).eval()

    results: dict[str, Any] = {
        "model": model_src, "name": Path(model_src).name if Path(model_src).is_dir() else model_src,
        "teacher": teacher_kw["source"] if teacher_kw else None, "suite": cfg.suite,
        "lm_eval": harness.version() if manager is not None else None,
        "tokens_seen": ((run_info or {}).get("metrics") or {}).get("tokens_seen"), "tasks": {},
    }
    if offline:
        datamodule = instantiate_checked(cfg.data)
        datamodule.set_tokenizer(tokenizer)
        datamodule.setup("validate")
        from lrc.eval.heldout import heldout_metrics

        results["heldout"] = heldout_metrics(model, datamodule.val_dataloader(), teacher)
    del teacher
    bs = int(cfg.batch_size)
    for name, path in local.items():
        if use_lm_eval:
            raw = harness.run_tasks(model, tokenizer, [name], manager, batch_size=bs, device=device, seed=int(cfg.seed))
            r = raw[name]
            entry = {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"], "n": len(read_mc_file(path))}
        else:
            from lrc.eval.mc import score_items, summarize

            entry = summarize(score_items(model, tokenizer, read_mc_file(path), batch_size=bs))
        results["tasks"][name] = {"metric": "acc", "value": entry["acc"], "num_fewshot": 0,
                                  "scorer": "lm_eval" if use_lm_eval else "lrc", "file": str(path), **entry}
    by_shots: dict[int | None, list] = {}
    for s in specs:
        by_shots.setdefault(s.num_fewshot, []).append(s)
    extra = [n for n in cfg.tasks if n not in {s.task for s in specs}]
    for shots, group in by_shots.items():
        raw = harness.run_tasks(model, tokenizer, [s.task for s in group], manager, num_fewshot=shots, batch_size=bs,
                                limit=cfg.limit, device=device, apply_chat_template=bool(cfg.apply_chat_template),
                                seed=int(cfg.seed))
        for s in group:
            r = raw.get(s.task, {})
            results["tasks"][s.task] = {"column": s.column, "metric": s.metric, "value": r.get(s.result_key),
                                        "num_fewshot": shots, "scorer": "lm_eval", "raw": _plain(r)}
    if extra:
        shots = None if cfg.num_fewshot is None else int(cfg.num_fewshot)
        raw = harness.run_tasks(model, tokenizer, extra, manager, num_fewshot=shots, batch_size=bs, limit=cfg.limit,
                                device=device, apply_chat_template=bool(cfg.apply_chat_template), seed=int(cfg.seed))
        for name in extra:
            r = raw.get(name, {})
            metric = next((k for k in ("acc_norm,none", "acc,none") if k in r), None) or next(
                (k for k, v in r.items() if isinstance(v, float) and "stderr" not in k), None)
            results["tasks"][name] = {"metric": metric.split(",")[0] if metric else None,
                                      "value": r.get(metric) if metric else None,
                                      "num_fewshot": shots if shots is not None else "default", "scorer": "lm_eval",
                                      "raw": _plain(r)}
    if specs:
        from lrc.eval.table import suite_average

        results["avg"] = suite_average(results)

    from lrc.eval.table import render_markdown

    out.mkdir(parents=True, exist_ok=True)
    if offline:
        import shutil

        shutil.copyfile(local[TASK_NAME], out / f"{TASK_NAME}.jsonl")
        results["tasks"][TASK_NAME]["file"] = str(out / f"{TASK_NAME}.jsonl")
    with atomic_write(out / "results.json", "w") as fh:
        fh.write(json.dumps(results, indent=2, default=_json_default))
    markdown = render_markdown(results)
    with atomic_write(out / "results.md", "w") as fh:
        fh.write(markdown)
    print(markdown)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


def _plain(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if isinstance(v, (int, float, str)) or v is None}


def _json_default(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else str(x)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    """One evaluation: a bad input prints ``lrc-eval: error: ...`` and exits with 2."""
    run_command("lrc-eval", run, cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
