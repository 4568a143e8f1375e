"""The small-scale studies (experiments/studies/*.sh): every job of every sweep composes, and the arms
of a study differ only where the study says (same tokens, data order, validation and optimizer)."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lrc.cli.common import CONF_DIR

STUDIES = Path(__file__).resolve().parents[1] / "experiments" / "studies"
#: what each study varies on purpose (config key prefixes); everything else must be equal across its jobs
VARIED = {
    "fig3": ("seed", "name", "method", "loss", "student"),
    "init": ("name", "student.init", "optim.lr", "optim.warmup_ratio", "loss.alpha"),
    "table7": ("seed", "name", "student.attn_sharing", "student.ffn_sharing"),
    "table3": ("seed", "name", "loss.term_weights"),
}
#: optimizer steps per job where a study departs from _common.sh's 40 (table3: 16 jobs in under an hour)
STEPS = {"table3": 20}


def scale_overrides() -> list[str]:
    text = (STUDIES / "_common.sh").read_text()
    return shlex.split(re.search(r"^SCALE=\((.*?)\)", text, re.S | re.M).group(1))


def sweeps(study: str) -> list[tuple[str, list[str]]]:
    """``(sweep name, its lrc-distill overrides)`` for every ``sweep`` line of a study script."""
    out = []
    for line in (STUDIES / f"{study}.sh").read_text().splitlines():
        if line.startswith("sweep "):
            words = [w for w in shlex.split(line) if w != "$@"]
            out.append((words[1], words[2:]))
    return out


def jobs(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic-sweeper expansion of ``overrides``: one plain override list per job."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(c) for c in itertools.product(*choices)]


def flat(cfg, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


@pytest.mark.parametrize("study", sorted(VARIED))
def test_every_study_job_composes_and_arms_differ_only_where_the_study_says(study):
    scale = scale_overrides()
    assert "ckpt_path=auto" in scale  # a rerun skips finished jobs
    composed = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name, overrides in sweeps(study):
            for job in jobs(overrides):
                cfg = compose("distill", overrides=[*scale, *job])
                composed.append(flat(OmegaConf.to_container(cfg, resolve=False)))
    assert len(composed) >= 2
    base = composed[0]
    for other in composed[1:]:
        differ = {k for k in set(base) | set(other) if base.get(k) != other.get(k)}
        unexpected = {k for k in differ if not k.startswith(VARIED[study])}
        assert not unexpected, (study, sorted(unexpected))
    for cfg in composed:  # the same tokens and validation in every job
        assert cfg["trainer.max_steps"] == STEPS.get(study, 40) and cfg["data.seq_len"] == 128 and cfg["data.batch_size"] == 4
        assert cfg["trainer.limit_val_batches"] == 2 and cfg["trainer.val_check_interval"] == 5
