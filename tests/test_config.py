"""Every config file shipped in conf/ composes, resolves and builds what it describes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lrc.cli.common import CONF_DIR
from lrc.model import CloneConfig
from lrc.training.module import method_class, validate_optim

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [  # options in sub-folders too (experiment=paper/fig3_lrc)
    (g, f.relative_to(CONF_DIR / g).with_suffix("").as_posix())
    for g in GROUPS for f in sorted((CONF_DIR / g).rglob("*.yaml"))
]


def composed(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=[f"paths.output_dir={tmp_path}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def test_groups_present():
    expected = {"teacher", "student", "loss", "method", "optim", "data", "trainer", "logger", "callbacks", "paths", "experiment", "debug"}
    assert expected <= set(GROUPS)
    assert len(OPTIONS) >= 25


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option, tmp_path):
    over = [f"{group}={option}"]
    if group == "teacher" and option == "hub":
        over.append("teacher.source=org/some-model")
    if group == "loss" and (CONF_DIR / "method" / f"{option}.yaml").is_file():
        over.append(f"method={option}")  # a method's own loss option, with that method
    if group in ("method", "loss") and option != "lrc":
        over.append("~experiment")  # the default job is an LRC recipe a baseline refuses (tests/test_methods.py)
    cfg = composed(over, tmp_path)
    # the pieces are accepted by the code that consumes them: the loss by the active method's settings
    method_class(cfg["method"]["_target_"]).loss_config(**cfg["loss"])
    CloneConfig(**cfg["student"]).validate(teacher_hidden_size=4096, num_teacher_layers=36)
    validate_optim({**cfg["optim"]})
    assert cfg["trainer"]["_target_"] == "lightning.Trainer"
    assert cfg["data"]["_target_"].startswith("lrc.data.")
    assert isinstance(cfg["logger"], list)
    if group == "experiment" and option != "demo":
        assert cfg["name"] != "lrc"  # experiments name their runs (demo is the default job: runs/lrc/...)


def test_the_default_job_is_the_demo_and_other_experiments_replace_it(tmp_path):
    """lrc-distill alone runs experiment/demo.yaml (rank 432, pca init, lr 3e-5, alpha 0); any other experiment
    replaces it, so the paper's small-scale artefacts keep the groups' paper-like settings."""
    default = composed([], tmp_path)
    assert (default["student"]["rank"], default["student"]["init"], default["optim"]["lr"]) == (432, "pca", 3e-5)
    assert default["loss"]["alpha"] == 0.0
    fig3 = composed(["experiment=paper/fig3_lrc"], tmp_path)
    assert (fig3["student"]["rank"], fig3["student"]["init"], fig3["optim"]["lr"]) == (288, "normal", 1e-3)
    assert fig3["loss"]["alpha"] == 0.2
    plain = composed(["~experiment"], tmp_path)  # no experiment at all: the groups alone
    assert (plain["student"]["rank"], plain["student"]["init"]) == (288, "normal")


def test_sweepable_keys_are_commented():
    """Every `key: value` line in conf/ carries a comment saying what it does."""
    uncommented = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#") or s.startswith("- ") or s.startswith("_target_"):
                continue
            m = re.match(r"^([A-Za-z_][\w.]*):\s*(.*)$", s)
            if m and m.group(2) and not m.group(2).startswith("#") and "#" not in m.group(2):
                uncommented.append(f"{path.relative_to(CONF_DIR)}:{n}: {s}")
    assert not uncommented, "\n".join(uncommented)


def test_cli_override_reaches_the_config(tmp_path):
    cfg = composed(["student.rank=144", "loss.alpha=0.5", "teacher=tiny_qwen3"], tmp_path)
    assert cfg["student"]["rank"] == 144 and cfg["loss"]["alpha"] == 0.5
    assert cfg["teacher"]["source"] == "tiny-qwen3"
    assert cfg["student"]["seed"] == cfg["seed"] == 0
