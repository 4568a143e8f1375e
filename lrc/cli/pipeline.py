"""``lrc-pipeline``: distill -> SFT -> evaluate in one command (Hydra config ``conf/pipeline.yaml``).

    lrc-pipeline                                               # the embedded default chain (about 20 CPU minutes)
    lrc-pipeline 'distill=["student.rank=288","trainer.max_steps=100"]' 'sft=["trainer.max_steps=50"]'
    lrc-pipeline stages=[distill,sft]                          # a part of the chain
    lrc-pipeline hydra.run.dir=runs/pipeline/<run>             # rerun: complete stages are skipped,
                                                               # an interrupted one resumes

Each stage is the stage's own command run on its own config (``conf/distill.yaml``,
``conf/sft.yaml``, ``conf/eval.yaml``) composed with the stage's overrides from the pipeline
config plus what the pipeline fixes: the stage's directory under the pipeline's output root, the
previous stage's output as its input, ``ckpt_path=auto``. Every stage's config is composed and
checked before the first stage starts; :mod:`lrc.pipeline` says when a stage is complete.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
from omegaconf import DictConfig, ListConfig, open_dict

from lrc.cli.common import CONF_DIR, ConfigError, lock_run_dir, run_command
from lrc.pipeline import STAGES, check_stages, is_complete, read_json, stage_dir, stage_input, stage_overrides


def resolve(path: str) -> Callable[..., Any]:
    """The function ``module:function`` names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@contextmanager
def _hydra_ready() -> Iterator[None]:
    """Hydra's config search on ``conf/``: the running one under ``@hydra.main``, else a new one."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def compose_stage(stage: str, overrides: list[str]) -> DictConfig:
    """The stage's config, composed from ``conf/<stage config>.yaml`` with ``overrides``, with its
    ``hydra`` node (which holds the overrides the stage records in its summary)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with _hydra_ready():
            return compose(STAGES[stage].config, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"stage {stage}: {' '.join(str(err).split())}") from None


@contextmanager
def stage_hydra(cfg: DictConfig) -> Iterator[DictConfig]:
    """The stage's config without its ``hydra`` node, with Hydra's global config set to the
    stage's for the block (so the stage records its own overrides, not the pipeline's), and the
    previous one restored after."""
    from hydra.core.hydra_config import HydraConfig

    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    plain = cfg.copy()
    with open_dict(plain):
        del plain["hydra"]
    try:
        yield plain
    finally:
        HydraConfig.instance().cfg = previous


def plan(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every selected stage composed and checked, in chain order, before any work:
    ``[{stage, dir, input, config}]``. Raises :class:`ConfigError` naming the stage."""
    from lrc.cli.checks import check_config

    check_config(cfg, CONF_DIR, "pipeline")
    try:
        selected = check_stages(list(cfg.stages))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    root = Path(cfg.paths.output_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output path {root} is a file, not a directory; choose another one (hydra.run.dir=...)")
    steps = []
    for stage in STAGES:  # every stage's list, selected or not, so a typo never waits for a later run
        own = cfg.get(stage)
        if own is not None and not (isinstance(own, ListConfig) and all(isinstance(o, str) for o in own)):
            raise ConfigError(f"{stage} must be a list of {STAGES[stage].config} overrides (strings, "
                              f"e.g. {stage}='[\"trainer.max_steps=10\"]'), got {own!r}")
    for stage in selected:
        try:
            overrides = stage_overrides(stage, list(cfg[stage] or []), root, selected, cfg.paths.cache_dir)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        composed = compose_stage(stage, overrides)
        with stage_hydra(composed) as stage_cfg:
            for check in STAGES[stage].checks:
                try:
                    resolve(check)(stage_cfg)
                except (ValueError, FileNotFoundError) as err:  # ConfigError, and the library's own refusals
                    raise ConfigError(f"stage {stage}: {err}") from None
        later = selected[selected.index(stage) + 1:]
        if later and STAGES[stage].output != "results.json" and not composed.export.enabled:
            raise ConfigError(f"stage {stage}: export.enabled=false, but stage {later[0]} reads its {STAGES[stage].output}/")
        steps.append({"stage": stage, "dir": stage_dir(root, stage), "input": stage_input(root, stage, selected),
                      "config": composed})
    first = steps[0]
    if first["input"] is not None and not (first["input"] / "config.json").is_file():
        raise ConfigError(f"stage {first['stage']} reads {first['input']}, which holds no model; run the stages "
                          f"before it first (stages=[...]) in this output root")
    return steps


def run(cfg: DictConfig) -> dict[str, Any]:
    """The pipeline: every stage checked first, then each run in order unless complete. Returns
    ``{stage: {"status": "ran" | "skipped", "dir": ..., "result": its summary}}``."""
    steps = plan(cfg)
    root = Path(cfg.paths.output_dir)
    report: dict[str, Any] = {}
    with lock_run_dir(root, "lrc-pipeline"):
        for step in steps:
            stage, directory, source = step["stage"], step["dir"], step["input"]
            if is_complete(stage, directory, source):
                print(f"lrc-pipeline: stage {stage}: complete in {directory}, skipped", file=sys.stderr)
                status = "skipped"
            else:
                print(f"lrc-pipeline: stage {stage}: running in {directory}", file=sys.stderr)
                with stage_hydra(step["config"]) as stage_cfg:
                    resolve(STAGES[stage].runner)(stage_cfg)
                if not is_complete(stage, directory, source):
                    summary = read_json(directory / "metrics.json") or {}
                    raise ConfigError(
                        f"stage {stage} stopped before completing (status {summary.get('status', 'unknown')!r}); "
                        f"run the same command again (hydra.run.dir={root}) to resume it"
                    )
                status = "ran"
            result = read_json(directory / ("results.json" if stage == "eval" else "metrics.json"))
            report[stage] = {"status": status, "dir": str(directory), "result": result}
    print("lrc-pipeline: " + ", ".join(f"{s} {r['status']}" for s, r in report.items()) + f"; output root {root}")
    return report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pipeline")
def _hydra_main(cfg: DictConfig) -> None:
    """A bad input or a stopped stage prints ``lrc-pipeline: error: ...`` and exits with 2."""
    run_command("lrc-pipeline", run, cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
