"""The README's main job (lrc-distill with no overrides) on the real teacher, shortened to a few
steps (slow: the embedded corpus is built and tokenized with the SmolLM2 tokenizer once)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

from lrc.cli.common import CONF_DIR
from lrc.cli.distill import run

pytestmark = pytest.mark.slow


def test_main_job_few_steps(tmp_path, smollm2_cache):
    out = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=[
            f"paths.output_dir={out}", f"paths.cache_dir={smollm2_cache}",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "summary.max_new_tokens=8", "data.batch_size=2",  # half the demo's 4 sequences: half the time
        ])
    # the defaults the README promises: the embedded default job (experiment/demo.yaml)
    assert cfg.teacher.source == "smollm2-135m-instruct" and cfg.student.rank == 432 and cfg.student.init == "pca"
    assert cfg.data.seq_len == 256 and cfg.data.sources[0].kind == "embedded" and cfg.data.batch_size == 2
    summary = run(cfg)
    assert summary["steps"] == 2
    assert summary["tokens_seen"] == 2 * cfg.data.batch_size * 256 == summary["tokens_per_source"]["embedded"]
    val, before = summary["val"], summary["val_before"]
    # the real teacher predicts held-out English docstrings far better than a fresh student
    assert 1.0 < val["teacher_ce"] < 4.5
    assert val["ce"] > val["teacher_ce"] and before["ce"] > val["teacher_ce"]
    assert 0.0 <= val["top1_agreement"] <= 1.0 and val["kl"] > 0
    # the pca init starts the student within 1.5 nats of the teacher (a normal init: about 8 nats
    # behind). A few steps at the demo's small lr keep most of that head start: on this one
    # validation batch CE moved by +0.1 and +0.9 in two test runs (5.01 -> 5.11 / 5.91; the 30-step
    # job goes 4.48 -> 4.23 on 16 sequences), where a large lr (2e-4 and up) throws it back above 10
    assert before["ce"] - val["teacher_ce"] < 1.5
    assert val["ce"] < before["ce"] + 2.0
    student = AutoModelForCausalLM.from_pretrained(summary["export_dir"])
    assert student.config.hidden_size == 432 and student.config.num_hidden_layers == 30
    assert isinstance(summary["answer"], str)
    assert json.loads((out / "metrics.json").read_text())["tokens_seen"] == summary["tokens_seen"]
