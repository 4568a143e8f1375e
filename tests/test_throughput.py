"""The throughput callback's arithmetic (tokens/s, TFLOP/s and MFU per device) against a fake clock,
its peak table, and FLOPs per token from a run config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lrc.training.callbacks import ThroughputMonitor, peak_tflops_for, run_flops_per_token


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeModule:
    def __init__(self) -> None:
        self.tokens_seen, self.logged, self.run_config = 0, [], None
        self.device = SimpleNamespace(type="cpu")

    def log_dict(self, values, **kwargs):
        self.logged.append(dict(values))


def test_throughput_arithmetic_with_a_fake_clock():
    clock = FakeClock()
    cb = ThroughputMonitor(peak_tflops=500.0, flops_per_token=2e9, every_n_steps=2, clock=clock)
    module, trainer = FakeModule(), SimpleNamespace(world_size=4, global_step=0)
    cb.on_train_start(trainer, module)
    # step 1: not a logging step; step 2: 4 devices saw 80,000 tokens in 2.5 s since the start
    for step, (dt, tokens) in enumerate([(1.0, 30_000), (1.5, 50_000)], start=1):
        clock.now += dt
        module.tokens_seen += tokens
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, step - 1)
    cb.on_train_batch_end(trainer, module, None, None, 2)  # a second micro-batch of the same step: no new entry
    assert len(module.logged) == 1
    per_device = 80_000 / 2.5 / 4  # 8,000 tokens/s per device
    assert module.logged[0]["perf/tokens_per_s_per_device"] == pytest.approx(per_device)
    assert module.logged[0]["perf/tflops_per_device"] == pytest.approx(per_device * 2e9 / 1e12)  # 16 TFLOP/s
    assert module.logged[0]["perf/mfu"] == pytest.approx(16 / 500)


def test_no_mfu_without_a_peak_and_no_tflops_without_flops():
    cb = ThroughputMonitor(clock=FakeClock())
    assert cb.measure(0, 0.0, 1) == {}
    assert cb.measure(1000, 2.0, 1) == {"perf/tokens_per_s_per_device": 500.0}
    cb.flops_per_token = 1e12
    assert cb.measure(2000, 4.0, 1) == {"perf/tokens_per_s_per_device": 500.0, "perf/tflops_per_device": 500.0}


def test_peak_table_and_bad_settings():
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("cpu") is None and peak_tflops_for(None) is None
    with pytest.raises(ValueError, match="every_n_steps"):
        ThroughputMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="peak_tflops"):
        ThroughputMonitor(peak_tflops=-1)


def test_flops_per_token_from_a_run_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lrc.cli.common import CONF_DIR
    from lrc.cli.estimate import estimate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=["teacher=tiny_llama", "student.rank=16"])
    want = estimate(cfg)["flops_per_token"]["total"]
    assert run_flops_per_token(OmegaConf.to_container(cfg, resolve=False)) == pytest.approx(want)
    assert run_flops_per_token(None) is None
