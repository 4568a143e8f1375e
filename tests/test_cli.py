"""lrc-distill / lrc-export end to end on a tiny teacher and a small local corpus."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from lrc.cli.common import CONF_DIR, ConfigError
from lrc.cli.distill import run
from lrc.cli.export import export_checkpoint

BIN = Path(sys.executable).parent
WORDS = (
    "the student learns to copy the teacher through small projections of every weight matrix while "
    "the teacher stays frozen and the loss compares activations layer by layer across the network"
).split()


def write_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with path.open("w") as f:
        for i in range(n_docs):
            n = 20 + int(torch.randint(0, 40, (1,), generator=g))
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=g)]
            f.write(json.dumps({"text": f"Document {i}. " + " ".join(words) + "."}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")


def tiny_overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"paths.output_dir={out}",
        f"paths.cache_dir={out.parent / 'cache'}",
        "teacher=tiny_llama",
        "student.rank=16",
        "data=local_jsonl",
        f"data.sources=[{{name:toy,kind:jsonl,path:'{corpus}'}}]",
        "data.seq_len=32",
        "data.batch_size=2",
        "data.val_fraction=0.2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        "logger=csv",
        "summary.max_new_tokens=2",
        *extra,
    ]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("distill", overrides=overrides)


def test_default_job_on_tiny_teacher(corpus, tmp_path):
    out = tmp_path / "run"
    summary = run(compose_cfg(tiny_overrides(corpus, out)))
    assert summary["steps"] == 4
    assert summary["tokens_seen"] == 4 * 2 * 32 == summary["tokens_per_source"]["toy"]
    for key in ("ce", "teacher_ce", "kl", "top1_agreement", "ppl"):
        assert key in summary["val"] and key in summary["val_before"]
    assert 0.0 <= summary["val"]["top1_agreement"] <= 1.0
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    metrics = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("train/loss", "train/ce", "train/kl", "train/clone", "train/clone/down", "train/lr",
                "train/grad_norm", "train/tokens_seen", "train/tokens/toy", "val/ce", "val/top1_agreement"):
        assert col in metrics, col
    assert any(c.startswith("train_layers/clone/q/") for c in metrics)
    # the export is a plain model whose logits equal the trained clone's student
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any("teacher" in k for k in ckpt["state_dict"])
    assert ckpt["lrc"]["config"]["student"]["rank"] == 16 and ckpt["lrc"]["config"]["data"]["seq_len"] == 32
    # lrc-export from the checkpoint alone gives the same model
    again = export_checkpoint(out / "checkpoints" / "last.ckpt", tmp_path / "again")
    other = AutoModelForCausalLM.from_pretrained(again)
    ids = torch.randint(0, 259, (1, 16))
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, other(ids).logits, atol=1e-6)


OPTIONS = sorted([("experiment", p.stem) for p in (CONF_DIR / "experiment").glob("*.yaml")]
                 + [("debug", p.stem) for p in (CONF_DIR / "debug").glob("*.yaml")])


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_fast_dev_run_of_every_experiment_and_debug_option(corpus, tmp_path, group, option):
    extra = [f"{group}={option}"]
    if group == "experiment":
        # paper setups name hub teachers, GPUs and hub data: swap those for tiny local ones
        extra += ["teacher=tiny_llama", "teacher.source=tiny-llama", "teacher.dtype=float32", "trainer=cpu",
                  "debug=fast_dev_run", "student.rank=16", "loss.clone_layers=null"]
    over = tiny_overrides(corpus, tmp_path / "run", *extra)
    # tiny_overrides sets data=local_jsonl; the experiment's data override would win otherwise
    cfg = compose_cfg(over)
    cfg.data.seq_len, cfg.data.batch_size = 32, 2
    summary = run(cfg)
    assert summary["steps"] >= 1
    assert summary["val"]["ce"] > 0
    assert Path(summary["export_dir"], "config.json").is_file()


def test_overfit_debug_option_drives_training_loss_down(corpus, tmp_path):
    cfg = compose_cfg(tiny_overrides(corpus, tmp_path / "run", "debug=overfit", "trainer.max_steps=25",
                                     "optim.lr=0.02", "logger=csv"))
    run(cfg)
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 25 and losses[-1] < 0.9 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5]) and min(losses) < losses[0]


# ------------------------------------------------------------------------------ bad input
def _bad(corpus, tmp_path, *extra):
    return compose_cfg(tiny_overrides(corpus, tmp_path / "run", *extra))


@pytest.mark.parametrize(
    "extra,exc,match",
    [
        (["student.rank=65"], ValueError, r"rank must be an integer in \[1, 64\]"),
        (["student.rank=0"], ValueError, r"rank must be an integer in \[1, 64\]"),
        (["teacher=hub", "teacher.source=/no/such/teacher"], FileNotFoundError, "/no/such/teacher"),
        (["trainer.max_steps=0"], ConfigError, "max_steps must be a positive"),
        (["optim.lr=-0.1"], ConfigError, "optim.lr must be >= 0"),
        (["data.seq_len=1024"], ConfigError, "exceeds the teacher's maximum of 512"),
        (["data.sources=[{name:x,kind:jsonl,path:/no/such/file.jsonl}]"], FileNotFoundError, "no/such/file"),
        (["loss.clone_layers=[7]"], ValueError, r"\[7\] are not layers the student keeps"),
        (["loss.kl_reduction=batchmean"], ValueError, "kl_reduction must be one of"),
        (["ckpt_path=last"], ConfigError, "last.ckpt does not exist"),
        (["export.dtype=int8"], ConfigError, "export.dtype must be one of"),
    ],
)
def test_bad_input_is_rejected_before_any_write(corpus, tmp_path, extra, exc, match):
    with pytest.raises(exc, match=match):
        run(_bad(corpus, tmp_path, *extra))
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_data_files(corpus, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run(_bad(corpus, tmp_path, f"data.sources=[{{name:x,kind:jsonl,path:'{empty}'}}]"))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        run(_bad(corpus, tmp_path, f"data.sources=[{{name:x,kind:jsonl,path:'{nofield}'}}]"))


@pytest.mark.parametrize("override", ["student=nonexistent", "student.ranks=8", "trainer.max_stepz=3"])
def test_unknown_options_and_keys_fail_composition(corpus, tmp_path, override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(tiny_overrides(corpus, tmp_path / "run", override))


def test_ckpt_path_auto_starts_fresh_then_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    first = run(compose_cfg(tiny_overrides(corpus, out, "ckpt_path=auto")))
    assert first["steps"] == 4 and "val_before" in first and first["val_before"]
    longer = run(compose_cfg(tiny_overrides(corpus, out, "ckpt_path=auto", "trainer.max_steps=6")))
    assert longer["steps"] == 6 and longer["tokens_seen"] == 6 * 2 * 32
    assert not longer["val_before"]  # resumed: no "before training" pass
    import csv

    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == [0, 1, 2, 3, 4, 5]  # history kept


def test_output_directory_holding_another_run(corpus, tmp_path):
    out = tmp_path / "run"
    run(compose_cfg(tiny_overrides(corpus, out)))
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        run(compose_cfg(tiny_overrides(corpus, out, "student.rank=8")))
    assert (out / "config.yaml").read_text() == before


# ------------------------------------------------------------------- processes: sweeps, signals
def lrc_distill(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(BIN / "lrc-distill"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, **kw)


def test_cli_error_is_one_clear_line(corpus, tmp_path):
    args = [a for a in tiny_overrides(corpus, tmp_path / "run", "student.rank=999") if not a.startswith("paths.output_dir")]
    p = lrc_distill([*args, f"hydra.run.dir={tmp_path / 'run'}"])
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "lrc-distill: error: CloneConfig.rank must be an integer in [1, 64]" in out
    assert "Traceback" not in out


def test_multirun_sweep_writes_one_directory_per_job(corpus, tmp_path):
    args = [a for a in tiny_overrides(corpus, tmp_path / "x") if not a.startswith("paths.output_dir")]
    args = [a for a in args if not a.startswith("summary.")]
    p = lrc_distill(["-m", *args, "student.rank=8,16", "loss.alpha=0.2,0.5", "trainer.max_steps=2",
                     "export.enabled=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(job / "config.yaml")
        seen.add((cfg.student.rank, cfg.loss.alpha))
        assert json.loads((job / "metrics.json").read_text())["steps"] == 2
    assert seen == {(8, 0.2), (8, 0.5), (16, 0.2), (16, 0.5)}


def _slow_args(corpus, run_dir):
    # enough steps that a signal lands mid-run; checkpoints every 3 steps
    args = [a for a in tiny_overrides(corpus, run_dir) if not a.startswith(("paths.output_dir", "trainer.max_steps",
                                                                               "callbacks.checkpoint"))]
    return [*args, f"hydra.run.dir={run_dir}", "trainer.max_steps=60", "callbacks.checkpoint.every_n_train_steps=3",
            "data.seq_len=128", "data.batch_size=4", "validate_before=false", "export.enabled=false",
            "trainer.val_check_interval=30", "logger=none"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - start < timeout
        time.sleep(0.02)


def _trainable(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return ckpt["state_dict"], ckpt["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    p = lrc_distill(_slow_args(corpus, run_dir))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    return _trainable(run_dir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_interrupt_and_resume_equals_uninterrupted(corpus, tmp_path, uninterrupted, sig):
    run_dir = tmp_path / "run"
    p = lrc_distill(_slow_args(corpus, run_dir))
    _wait_for(run_dir / "checkpoints" / "last.ckpt", p)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    _, step = _trainable(run_dir)
    assert step < 60, "the run finished before the signal"
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:  # graceful: a checkpoint of the step in flight, a clean exit and a resume hint
        assert p.returncode == 0, out[-3000:]
        assert "interrupted: checkpoint written" in out and "ckpt_path=last" in out
        assert json.loads((run_dir / "metrics.json").read_text())["interrupted"] is True
    resumed = lrc_distill([*_slow_args(corpus, run_dir), "ckpt_path=last"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    state, step = _trainable(run_dir)
    expected, expected_step = uninterrupted
    assert step == expected_step == 60
    assert set(state) == set(expected)
    for k in state:
        assert torch.equal(state[k], expected[k]), k


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = compose_cfg(tiny_overrides(corpus, out, "optim.lr=1e30", "optim.warmup_ratio=0", "trainer.max_steps=20",
                                     "callbacks.checkpoint.every_n_train_steps=1", "validate_before=false",
                                     "trainer.val_check_interval=20"))
    with pytest.raises(ConfigError, match=r"non-finite loss at step (\d+): offending terms"):
        run(cfg)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert 1 <= ckpt["global_step"] < 20
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.parametrize("every,expected_steps", [(0, []), (2, [0, 2])])
def test_per_layer_logging_frequency(corpus, tmp_path, every, expected_steps):
    import csv

    out = tmp_path / "run"
    run(compose_cfg(tiny_overrides(corpus, out, f"log.per_layer_every_n_steps={every}", "validate_before=false")))
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    logged = sorted(int(r["step"]) for r in rows if r.get("train_layers/clone/gate/1"))
    assert logged == expected_steps
    assert sum(1 for r in rows if r.get("train/clone/gate")) == 4  # summed terms: every step


def test_lrc_export_command_line(corpus, tmp_path, capsys):
    from lrc.cli.export import main as export_main

    out = tmp_path / "run"
    run(compose_cfg(tiny_overrides(corpus, out, "export.enabled=false", "validate_before=false")))
    with pytest.raises(SystemExit) as err:
        export_main([f"ckpt={out / 'checkpoints' / 'last.ckpt'}"])
    assert err.value.code == 2 and "missing required argument(s): out=..." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([f"ckpt={tmp_path / 'nope.ckpt'}", f"out={tmp_path / 'x'}"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main(["ckpt=a", "out=b", "colour=blue"])
    assert "colour" in capsys.readouterr().err
    export_main([f"ckpt={out / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'student'}", "dtype=bfloat16"])
    assert "exported student to" in capsys.readouterr().out
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tmp_path / "student")
    assert cfg.hidden_size == 16 and cfg.dtype in ("bfloat16", __import__("torch").bfloat16)
