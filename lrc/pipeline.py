"""One pipeline, distill -> SFT -> evaluate, under one output root: the stages, where each writes,
what each reads, and when each is complete. Pure functions over paths and files; the command that
composes and runs the stages is :mod:`lrc.cli.pipeline` (``lrc-pipeline``).

Layout under the root (``paths.output_dir`` of the pipeline)::

    distill/   an lrc-distill run: ... metrics.json, student/   (the exported student)
    sft/       an lrc-sft run:     ... metrics.json, model/     (the fine-tuned model)
    eval/      an lrc-eval run:    results.json, results.md

A stage is complete when its completion marker is there, the last thing the stage writes, atomically:
``metrics.json`` with ``status: finished`` beside a saved model (``student/`` or ``model/``, written
atomically before it) for distill and sft; ``results.json`` naming the model the stage was to
evaluate for eval. An interrupted stage leaves no marker (or ``status: interrupted``), so a rerun
resumes it from its last checkpoint and skips every complete stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

#: the chain, in order
STAGE_ORDER = ("distill", "sft", "eval")


@dataclass(frozen=True)
class Stage:
    """One stage: its primary Hydra config (``conf/<config>.yaml``), the function that runs a
    composed config (``module:function``, returning the summary dict), the settings-alone checks
    run for every stage before any stage starts, what it leaves for the next stage (relative to its
    directory), and the key through which it reads the previous stage's output (``None``: none)."""

    name: str
    config: str
    runner: str
    checks: tuple[str, ...]
    output: str
    input_key: str | None
    resumable: bool  # takes ckpt_path=auto: an interrupted run resumes from its last checkpoint


STAGES = {
    "distill": Stage("distill", "distill", "lrc.cli.distill:run",
                     ("lrc.cli.distill:check_settings", "lrc.cli.distill:check_teacher_fit"), "student", None, True),
    "sft": Stage("sft", "sft", "lrc.cli.sft:run", ("lrc.cli.sft:check_settings",), "model", "model.source", True),
    "eval": Stage("eval", "eval", "lrc.cli.eval:run", ("lrc.cli.eval:check_settings",), "results.json", "model", False),
}
#: keys the pipeline sets for every stage; a stage's own overrides may not set them
RESERVED = ("paths.output_dir", "hydra.", "ckpt_path")


def check_stages(stages: Sequence[str]) -> list[str]:
    """The selected stages in chain order; ``ValueError`` for none, an unknown or a repeated one."""
    stages = [str(s) for s in stages]
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise ValueError(f"stages must be a non-empty list of {list(STAGE_ORDER)}, got {stages}")
    repeated = sorted({s for s in stages if stages.count(s) > 1})
    if repeated:
        raise ValueError(f"stages names {repeated} more than once")
    return [s for s in STAGE_ORDER if s in stages]


def stage_dir(root: str | Path, stage: str) -> Path:
    """Where ``stage`` writes: ``<root>/<stage>``."""
    return Path(root) / stage


def stage_input(root: str | Path, stage: str, selected: Sequence[str]) -> Path | None:
    """What ``stage`` reads: the output of the selected stage just before it in the chain, or, for
    a stage that no selected stage feeds, of the stage just before it in the whole chain (which an
    earlier pipeline run in this root must have completed). ``None`` for distill."""
    if STAGES[stage].input_key is None:
        return None
    before = STAGE_ORDER[: STAGE_ORDER.index(stage)]
    fed = [s for s in before if s in selected]
    source = fed[-1] if fed else before[-1]
    return stage_dir(root, source) / STAGES[source].output


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(stage: str, directory: str | Path, model: str | Path | None = None) -> bool:
    """Whether ``stage``'s output in ``directory`` is complete: ``metrics.json`` with status
    ``finished`` and the saved model (``config.json`` in ``student/`` or ``model/``) for distill
    and sft; for eval, ``results.json`` whose ``model`` is ``model`` (the stage's input)."""
    directory = Path(directory)
    spec = STAGES[stage]
    if stage == "eval":
        results = read_json(directory / spec.output)
        if results is None or "model" not in results:
            return False
        return model is None or _same_path(results["model"], model)
    summary = read_json(directory / "metrics.json")
    return bool(summary) and summary.get("status") == "finished" and (directory / spec.output / "config.json").is_file()


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def reserved_override(override: str, stage: str) -> str | None:
    """The key of ``override`` if the pipeline sets it itself (the stage's directory, resume
    setting, hydra keys, and the key through which the stage reads its input); else ``None``."""
    key = override.lstrip("+~").split("=", 1)[0].strip()
    own = STAGES[stage].input_key
    if key == own or any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESERVED):
        return key
    return None


def stage_overrides(
    stage: str, user: Sequence[str], root: str | Path, selected: Sequence[str], cache_dir: str | None = None
) -> list[str]:
    """The overrides ``stage`` is composed with: the pipeline's ``paths.cache_dir``, then the
    stage's own overrides from the pipeline config, then what the pipeline fixes: the stage's
    directory, ``ckpt_path=auto`` (resume, or skip a finished run) and its input. ``ValueError``
    for an own override of a key the pipeline sets."""
    for o in user:
        key = reserved_override(str(o), stage)
        if key is not None:
            raise ValueError(f"{stage}: the pipeline sets {key} itself; remove {o!r} from the stage's overrides")
    spec = STAGES[stage]
    fixed = [f"paths.output_dir={quote(stage_dir(root, stage))}"]
    fixed += ["ckpt_path=auto"] if spec.resumable else []
    source = stage_input(root, stage, selected)
    if source is not None:
        fixed.append(f"{spec.input_key}={quote(source)}")
    return ([f"paths.cache_dir={quote(cache_dir)}"] if cache_dir else []) + [str(o) for o in user] + fixed


def quote(path: str | Path) -> str:
    """``path`` as a quoted Hydra override value (any character but a quote of each kind)."""
    text = str(path)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ValueError(f"path {text!r} holds both kinds of quote; the pipeline cannot pass it to a stage")
