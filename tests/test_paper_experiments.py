"""The paper's artefacts at small scale (conf/experiment/paper/): every Figure 3 arm, Table 3 and
Table 7 run shares the data, optimizer, schedule and tokens of paper/fig3_lrc and differs from it
only where its paper artefact says, and the sweep commands the files document expand into exactly
the jobs of their table (composed here, not run: tests/test_cli.py runs every option on a tiny teacher)."""

from __future__ import annotations

import copy
import functools
import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lrc.analysis.collect import Run, removed_terms
from lrc.cli.common import CONF_DIR
from lrc.losses import CLONE_TERMS

PAPER = CONF_DIR / "experiment" / "paper"
FIG3 = sorted(f"paper/{p.stem}" for p in PAPER.glob("fig3_*.yaml"))
ALL = sorted(f"paper/{p.stem}" for p in PAPER.glob("*.yaml"))
SHARED = ("data", "optim", "trainer", "seed", "global_batch_size", "teacher", "callbacks", "logger")


@functools.lru_cache(maxsize=None)
def _compose(overrides: tuple[str, ...], hydra: bool) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=["paths.output_dir=/nonexistent/run", *overrides], return_hydra_config=hydra)
    return OmegaConf.to_container(cfg, resolve=not hydra)


def compose_exp(*overrides: str, hydra: bool = False) -> dict:
    """The lrc-distill config for these overrides (composed once per test session)."""
    return copy.deepcopy(_compose(overrides, hydra))


def documented_sweep(option: str) -> list[list[str]]:
    """The jobs of the `lrc-distill -m ...` command in the comments of experiment ``option``, as
    Hydra's basic sweeper splits them (with the file's own hydra.sweeper.params)."""
    text = (CONF_DIR / "experiment" / f"{option}.yaml").read_text()
    (line,) = [m for m in re.findall(r"^#\s+(lrc-distill -m .*)$", text, re.M)]
    args = [a for a in shlex.split(line)[2:] if not a.startswith("hydra.sweep.dir=")]
    experiment = next(a for a in args if a.startswith("experiment="))
    params = compose_exp(experiment.split(",")[0], hydra=True)["hydra"]["sweeper"].get("params") or {}
    parser = OverridesParser.create()
    overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + args)
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    return batch


def test_every_paper_artefact_has_its_file():
    expected = {"fig3_lrc", "fig3_kd", "fig3_tinybert", "fig3_no_clone", "fig3_no_ffn_terms", "fig3_no_attn_terms",
                "fig3_no_alignment_free", "table3_base", "table7_sharing"}
    assert {o.split("/")[1] for o in ALL} == expected


@pytest.mark.parametrize("option", ALL)
def test_arms_share_data_optimizer_and_tokens(option):
    """Same teacher, data (order: same seed), optimizer, schedule, steps and validation batches as
    paper/fig3_lrc: 100 steps x 4 x 128 = 51,200 training tokens of the embedded corpus."""
    base, cfg = compose_exp("experiment=paper/fig3_lrc"), compose_exp(f"experiment={option}")
    for key in SHARED:
        assert cfg[key] == base[key], key
    assert cfg["trainer"]["max_steps"] * cfg["data"]["batch_size"] * cfg["data"]["seq_len"] == 51_200
    assert cfg["data"]["sources"] == [{"name": "embedded", "kind": "embedded"}]
    assert cfg["teacher"]["source"] == "smollm2-135m-instruct" and cfg["student"]["rank"] == 288


def test_every_artefact_names_its_own_run_directory():
    names = [compose_exp(f"experiment={o}")["name"] for o in ALL]
    assert len(set(names)) == len(ALL) and "lrc" not in names


def differences(a, b, prefix=""):
    """Dotted keys whose values differ between two nested dicts."""
    out = set()
    for k in set(a) | set(b):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out |= differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.add(f"{prefix}{k}")
    return out


@pytest.mark.parametrize(
    "option,changed",
    [
        ("paper/fig3_no_clone", {"loss.alpha": 0.0}),
        ("paper/fig3_no_ffn_terms", {"loss.term_weights.gate": 0.0, "loss.term_weights.up": 0.0,
                                     "loss.term_weights.down": 0.0}),
        ("paper/fig3_no_attn_terms", {f"loss.term_weights.{t}": 0.0 for t in "qkvo"}),
        ("paper/fig3_no_alignment_free", {"loss.output_alignment": "learned"}),
        ("paper/table3_base", {"student.attn_sharing": "all"}),
        ("paper/table7_sharing", {"loss.alpha": 1.0, "student.attn_sharing": "all"}),
    ],
)
def test_lrc_arms_change_only_their_loss_or_student_keys(option, changed):
    base, cfg = compose_exp("experiment=paper/fig3_lrc"), compose_exp(f"experiment={option}")
    assert base["student"]["attn_sharing"] == "io" and base["method"]["name"] == "lrc"
    diff = differences(base, cfg) - {"name"}
    assert diff == set(changed)
    flat = {k: OmegaConf.select(OmegaConf.create(cfg), k) for k in changed}
    assert flat == changed


@pytest.mark.parametrize("option,method", [("paper/fig3_kd", "kd"), ("paper/fig3_tinybert", "tinybert")])
def test_baseline_arms_change_the_method_only(option, method):
    base, cfg = compose_exp("experiment=paper/fig3_lrc"), compose_exp(f"experiment={option}")
    assert cfg["method"]["name"] == method
    assert cfg["loss"] == compose_exp("~experiment", f"method={method}")["loss"]  # the method's own loss settings
    assert cfg["student"] == {**base["student"], "attn_sharing": "all"}  # the shape of the LRC export


def test_fig3_sweep_runs_every_arm():
    jobs = documented_sweep("paper/fig3_lrc")
    assert sorted({j[0] for j in jobs}) == [f"experiment={o}" for o in FIG3]
    assert len(jobs) == len(FIG3) * 2  # two seeds
    for job in jobs[:: 2]:
        compose_exp(*job)


def test_table3_sweep_drops_one_term_per_job():
    """One job with every term, then one per term with only that term's weight at 0 (Table 3)."""
    jobs = documented_sweep("paper/table3_base")
    assert len(jobs) == 16 and sum("seed=0" in job for job in jobs) == 8
    removed = []
    for job in (j for j in jobs if "seed=0" in j):
        cfg = compose_exp(*job)
        removed.append(removed_terms(Run(path=None, status="finished", config=cfg)))
        assert sum(w == 0 for w in cfg["loss"]["term_weights"].values()) == len(removed[-1])
    assert removed == [(), *[(t,) for t in CLONE_TERMS]]


def test_table7_sweep_runs_the_four_sharing_cells_at_alpha_1():
    jobs = documented_sweep("paper/table7_sharing")
    cells = set()
    for job in jobs:
        cfg = compose_exp(*job)
        assert cfg["loss"]["alpha"] == 1.0
        cells.add((cfg["student"]["attn_sharing"], cfg["student"]["ffn_sharing"], cfg["seed"]))
    assert cells == {(a, f, s) for a in ("all", "io") for f in ("all", "io") for s in (0, 1)}
    assert len(jobs) == 8
