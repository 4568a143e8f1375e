"""lrc-distill / lrc-export end to end on a tiny teacher and a small local corpus."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
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
        # not the embedded default job (experiment/demo.yaml) but the groups' plain defaults, unless
        # the test picks an experiment itself
        *([] if any(e.startswith("experiment=") for e in extra) else ["~experiment"]),
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
                "train/grad_norm_preclip", "train/tokens_seen", "train/tokens/toy", "val/ce", "val/top1_agreement"):
        assert col in metrics, col
    assert any(c.startswith("train_layers/clone/q/") for c in metrics)
    # the export is a plain model whose logits equal the trained clone's student
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("teacher" in k for k in ckpt["state_dict"])
    assert ckpt["lrc"]["config"]["student"]["rank"] == 16 and ckpt["lrc"]["config"]["data"]["seq_len"] == 32
    # lrc-export from the checkpoint alone gives the same model
    again = export_checkpoint(out / "checkpoints" / "last.ckpt", tmp_path / "again")
    other = AutoModelForCausalLM.from_pretrained(again)
    ids = torch.randint(0, 259, (1, 16))
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, other(ids).logits, atol=1e-6)


def test_final_validation_reuses_the_fits_last_one_only_when_it_ran_after_the_last_step(corpus, tmp_path):
    """val_check_interval=2 of 4 steps: the fit validated after step 4, and the summary's ``val`` is
    that validation (curves.csv holds no second row for it); at 3 the fit's last validation is after
    step 3, so the summary validates again after step 4. The weights after 4 steps
    are the same in both runs, so the two ``val`` agree."""
    from lrc.analysis.curves import read_curves

    reused = run(compose_cfg(tiny_overrides(corpus, tmp_path / "a", "trainer.val_check_interval=2")))
    again = run(compose_cfg(tiny_overrides(corpus, tmp_path / "b", "trainer.val_check_interval=3")))
    val_steps = lambda d: [r["step"] for r in read_curves(d / "curves.csv") if "val/ce" in r]  # noqa: E731
    # rows of the fit's validations carry Lightning's logging step (the step index, one below the
    # count of steps done); the final validation's, the count: b's second pass is its row at 4
    assert val_steps(tmp_path / "a") == [0, 1, 3]
    assert val_steps(tmp_path / "b") == [0, 2, 4]
    assert reused["val"] == again["val"] and set(reused["val"]) >= {"ce", "teacher_ce", "kl", "top1_agreement"}
    last = read_curves(tmp_path / "a" / "curves.csv")[-1]
    assert reused["val"]["ce"] == round(last["val/ce"], 4)


def group_options(group: str) -> list[str]:
    """A group's options, those in sub-folders included (``experiment=paper/fig3_lrc``)."""
    folder = CONF_DIR / group
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


OPTIONS = [(g, o) for g in ("experiment", "debug", "method") for o in group_options(g)]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_fast_dev_run_of_every_experiment_debug_and_method_option(corpus, tmp_path, group, option):
    extra = [f"{group}={option}"]
    if group == "experiment":
        # paper setups name hub teachers, GPUs and hub data: swap those for tiny local ones (their
        # layer selections are teacher-independent specs, so they stay as they are)
        extra += ["teacher=tiny_llama", "teacher.source=tiny-llama", "teacher.dtype=float32", "trainer=cpu",
                  "debug=fast_dev_run", "student.rank=16"]
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
        (["loss.clone_layers=[7]"], ValueError, r"LossConfig.clone_layers has indices out of range \[-4, 3\] \(4 layers\): \[7\]"),
        (["student.layers={every:2}", "loss.clone_layers=[-1]"], ValueError,
         r"LossConfig.clone_layers \[3\] are not layers the student keeps \[0, 2\]"),
        (["student.layers={first:5}"], ValueError, r"CloneConfig.layers.first must be at most the 4 layers, got 5"),
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
    # the same run again: it already finished 6 steps, so it is skipped (a rerun sweep redoes nothing)
    stamp = (out / "metrics.json").stat().st_mtime_ns
    again = run(compose_cfg(tiny_overrides(corpus, out, "ckpt_path=auto", "trainer.max_steps=6")))
    assert again == longer and (out / "metrics.json").stat().st_mtime_ns == stamp


def test_output_directory_holding_another_run(corpus, tmp_path):
    out = tmp_path / "run"
    run(compose_cfg(tiny_overrides(corpus, out)))
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        run(compose_cfg(tiny_overrides(corpus, out, "student.rank=8")))
    assert (out / "config.yaml").read_text() == before


# ------------------------------------------------------------------- the real CLI, in this process
def cli_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    """``tiny_overrides`` as lrc-distill arguments: the run directory is Hydra's ``hydra.run.dir``."""
    return [a for a in tiny_overrides(corpus, out, *extra) if not a.startswith("paths.output_dir")] + [
        f"hydra.run.dir={out}"]


def cli(capsys, tool: str, *args: str) -> tuple[int, str]:
    """Run the ``lrc-distill`` / ``lrc-export`` entry point in this process with ``args`` as its
    command line (no 10 s interpreter start): ``(exit status, stdout + stderr)``."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from lrc.cli.distill import main as distill_main
    from lrc.cli.export import main as export_main

    argv, code = sys.argv, 0
    sys.argv = [f"lrc-{tool}", *args]
    try:
        distill_main() if tool == "distill" else export_main(list(args))
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # so later in-process runs do not see this command line
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _state(ckpt: Path) -> tuple[dict[str, torch.Tensor], int]:
    state = torch.load(ckpt, weights_only=True)
    return state["state_dict"], state["global_step"]


def _finite(state_dict: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state_dict.values())


# ------------------------------------------------------------------------------- NaN updates
@pytest.mark.parametrize("max_steps,poisoned", [(6, 2), (4, 3)], ids=["mid-run", "last-step"])
def test_nan_update_is_never_checkpointed_or_exported(corpus, tmp_path, capsys, max_steps, poisoned):
    """The update of step ``poisoned`` writes NaN weights while its loss is finite (a NaN gradient,
    spread by clipping). Checkpoints every step: the last one must be the step before, finite."""
    out = tmp_path / "run"
    code, log = cli(capsys, "distill", *cli_args(
        corpus, out, f"trainer.max_steps={max_steps}", "callbacks.checkpoint.every_n_train_steps=1",
        "validate_before=false", f"+callbacks.poison={{_target_:cli_faults.PoisonGradAt,step:{poisoned}}}"))
    assert code == 2, log[-3000:]
    assert f"lrc-distill: error: training stopped: non-finite trainable tensors after the optimizer update of step {poisoned}" in log
    assert f"last.ckpt (step {poisoned}) is untouched and finite" in log and "Traceback" not in log
    state, step = _state(out / "checkpoints" / "last.ckpt")
    assert step == poisoned and _finite(state)
    assert not (out / "student").exists() and not (out / "metrics.json").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = compose_cfg(tiny_overrides(corpus, out, "optim.lr=1e30", "optim.warmup_ratio=0", "trainer.max_steps=20",
                                     "callbacks.checkpoint.every_n_train_steps=1", "validate_before=false",
                                     "trainer.val_check_interval=20"))
    with pytest.raises(ConfigError, match=r"non-finite loss at step (\d+): offending terms"):
        run(cfg)
    state, step = _state(out / "checkpoints" / "last.ckpt")
    assert 1 <= step < 20 and _finite(state)


def test_nan_before_the_first_checkpoint_then_the_directory_is_reused(corpus, tmp_path, capsys):
    """A start that fails before its first checkpoint leaves config.yaml and logs; a rerun in the same
    directory moves them aside and starts afresh, and ckpt_path=last says there is nothing to resume."""
    out = tmp_path / "run"
    code, log = cli(capsys, "distill", *cli_args(corpus, out, "validate_before=false",
                                                  "+callbacks.poison={_target_:cli_faults.PoisonGradAt,step:0}"))
    assert code == 2 and "update of step 0" in log and "no checkpoint was written" in log
    assert (out / "config.yaml").is_file() and not list(out.glob("checkpoints/*.ckpt"))
    code, log = cli(capsys, "distill", *cli_args(corpus, out, "ckpt_path=last"))
    assert code == 2 and "holds no checkpoint to resume; run again without ckpt_path=last" in log
    first_config = (out / "config.yaml").read_text()
    code, log = cli(capsys, "distill", *cli_args(corpus, out, "validate_before=false", "export.enabled=false"))
    assert code == 0, log[-3000:]
    assert "holds no checkpoint, only what a failed start left (config.yaml, csv" in log and "moved to failed-start-" in log
    (aside,) = out.glob("failed-start-*")
    assert (aside / "config.yaml").read_text() == first_config and (aside / "csv" / "metrics.csv").is_file()
    rows = list(__import__("csv").DictReader((out / "csv" / "metrics.csv").open()))
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == [0, 1, 2, 3]  # no rows of the failed start


# ------------------------------------------------------------------ crash-safe checkpoint writes
def test_failed_checkpoint_write_keeps_the_previous_one(corpus, tmp_path, capsys, monkeypatch):
    """A full disk in the middle of a checkpoint write: the previous last.ckpt stays byte for byte,
    no partial file is left, and the file was being written beside the target, not in $TMPDIR."""
    import errno

    out = tmp_path / "run"
    assert cli(capsys, "distill", *cli_args(corpus, out, "validate_before=false", "export.enabled=false"))[0] == 0
    last = out / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    stale = last.with_name(".last.ckpt.tmp-0badf00d")  # what a write killed earlier leaves
    stale.write_bytes(b"partial")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr("tempfile.tempdir", None)
    written_to = []
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        written_to.append(Path(f.name))
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    code, log = cli(capsys, "distill", *cli_args(corpus, out, "ckpt_path=last", "trainer.max_steps=6"))
    assert code == 2 and "Traceback" not in log
    assert f"lrc-distill: error: could not write checkpoint {last}: No space left on device; the previous one is intact" in log
    assert last.read_bytes() == before
    assert written_to and written_to[0].parent == last.parent and written_to[0].name.startswith(".last.ckpt.tmp-")
    assert not written_to[0].exists() and not list(tmpdir.iterdir())
    monkeypatch.setattr(torch, "save", real_save)
    code, log = cli(capsys, "distill", *cli_args(corpus, out, "ckpt_path=last", "trainer.max_steps=6"))
    assert code == 0, log[-3000:]
    assert _state(last)[1] == 6
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # the stale temp file is gone


# ------------------------------------------------------------------------- one run per directory
def test_second_run_in_a_locked_directory_fails_at_once(corpus, tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lrc-distill.lock", "w") as held:  # another run holds the directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7\n")
        held.flush()
        code, log = cli(capsys, "distill", *cli_args(corpus, out))
    assert code == 2
    assert (f"lrc-distill: error: output directory {out} is in use by another lrc-distill run (pid 4242 on node7); "
            f"wait for it to end or choose another directory") in log
    assert sorted(p.name for p in out.iterdir()) == [".lrc-distill.lock"]


# ------------------------------------------------------------------------------ bad input, CLI
@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A finished 4-step tiny run (config, checkpoints, no export), shared by the bad-input cases."""
    out = tmp_path_factory.mktemp("finished") / "run"
    summary = run(compose_cfg(tiny_overrides(corpus, out, "validate_before=false", "export.enabled=false")))
    assert summary["steps"] == 4
    return out


def _broken(kind: str, good: Path, path: Path) -> Path:
    data = good.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "random": os.urandom(100_000)}[kind])
    return path


BROKEN = {
    "empty": "is empty (0 bytes): the write that made it never finished",
    "truncated": "is not a readable PyTorch checkpoint: it is truncated, corrupt or another kind of file",
    "random": "is not a readable PyTorch checkpoint: it is truncated, corrupt or another kind of file",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_resume_or_export_from_a_broken_checkpoint(corpus, tmp_path, capsys, finished_run, kind):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    bad = _broken(kind, finished_run / "checkpoints" / "last.ckpt", out / "checkpoints" / "last.ckpt")
    code, log = cli(capsys, "distill", *cli_args(corpus, out, "ckpt_path=last", "trainer.max_steps=6"))
    assert code == 2 and f"lrc-distill: error: checkpoint {bad} " in log and BROKEN[kind] in log, log[-2000:]
    code, log = cli(capsys, "export", f"ckpt={bad}", f"out={tmp_path / 'student'}")
    assert code == 2 and f"lrc-export: error: checkpoint {bad} " in log and BROKEN[kind] in log, log[-2000:]
    assert "Traceback" not in log and not (tmp_path / "student").exists()


def test_checkpoint_that_would_run_code_is_refused(corpus, tmp_path, capsys, finished_run):
    """Checkpoints are read with weights_only=True, by lrc-export and by Lightning's resume alike."""
    from cli_faults import with_payload

    marker = tmp_path / "code-ran"
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    (out / "checkpoints").mkdir()
    evil = with_payload(finished_run / "checkpoints" / "last.ckpt", out / "checkpoints" / "last.ckpt", marker)
    expected = "holds objects other than tensors and plain values (io.open), so lrc-distill did not write it"
    code, log = cli(capsys, "export", f"ckpt={evil}", f"out={tmp_path / 'student'}")
    assert code == 2 and expected in log
    code, log = cli(capsys, "distill", *cli_args(corpus, out, "ckpt_path=last", "trainer.max_steps=6"))
    assert code == 2 and expected in log
    assert not marker.exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["student.rank=8"], "it was written with other settings (student.rank=16 there, 8 here)"),
        (["student.attn_sharing=io"], "(student.attn_sharing='all' there, 'io' here)"),
    ],
)
def test_resume_with_another_student_is_refused(corpus, tmp_path, capsys, finished_run, extra, message):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = (out / "checkpoints" / "last.ckpt").read_bytes()
    code, log = cli(capsys, "distill", *cli_args(corpus, out, "ckpt_path=last", "trainer.max_steps=6", *extra))
    assert code == 2 and f"lrc-distill: error: cannot resume from {out / 'checkpoints' / 'last.ckpt'}: " in log
    assert message in log and "drop those overrides, or start a new run in another directory" in log
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == before


@pytest.mark.parametrize(
    "extra,message",
    [
        (["+student.rnak=8"], "unknown key student.rnak (did you mean student.rank?)"),
        (["+foo=1"], "unknown key foo"),
        (["+optim.lrr=0.1"], "unknown key optim.lrr (did you mean optim.lr?)"),
        (["+trainer.max_stpes=3"], "unknown key trainer.max_stpes (did you mean trainer.max_steps?)"),
        (["trainer.max_steps=abc"], "trainer.max_steps must be an integer, got 'abc'"),
        (["loss.alpha=abc"], "loss.alpha must be a number, got 'abc'"),
        (["log.per_layer_every_n_steps=abc"], "log.per_layer_every_n_steps must be a number, got 'abc'"),
        (["optim.lr=inf"], "optim.lr must be >= 0 and finite, got inf"),
        (["+callbacks.extra=1"], "callbacks.extra must be a config with a _target_"),
    ],
)
def test_bad_keys_and_values_are_rejected_before_any_write(corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code, log = cli(capsys, "distill", *cli_args(corpus, out, *extra))
    assert code == 2 and f"lrc-distill: error: {message}" in log and "Traceback" not in log, log[-2000:]
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_gpu_trainer_without_a_gpu(corpus, tmp_path, capsys):
    code, log = cli(capsys, "distill", *cli_args(corpus, tmp_path / "run", "trainer=gpu"))
    assert code == 2
    assert "lrc-distill: error: trainer.accelerator=gpu but torch sees no CUDA GPU on this machine; use trainer=cpu" in log
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_output_path_that_is_a_file(corpus, tmp_path, capsys, finished_run):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, log = cli(capsys, "distill", *cli_args(corpus, afile))
    assert code == 2 and f"lrc-distill: error: output path {afile} is a file, not a directory" in log
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    code, log = cli(capsys, "export", f"ckpt={ckpt}", f"out={afile}")
    assert code == 2 and f"lrc-export: error: out={afile} is a file; give a directory for the exported model" in log
    code, log = cli(capsys, "export", f"ckpt={ckpt}", f"out={tmp_path / 's'}", "dtype=foo")
    assert code == 2 and "lrc-export: error: dtype must be one of float32, bfloat16, float16 (or omitted), got 'foo'" in log
    assert afile.read_text() == "mine" and "Traceback" not in log


TWO_CLIS = """
import sys
from lrc.cli.distill import main as distill
from lrc.cli.export import main as export
for name, call, argv in (("lrc-distill", distill, sys.argv[2:]), ("lrc-export", export, sys.argv[1].split())):
    sys.argv = [name, *argv]
    try:
        call() if name == "lrc-distill" else call(argv)
        code = 0
    except SystemExit as err:
        code = err.code
    print(f"{name} exit {code}", file=sys.stderr, flush=True)
"""


def test_read_only_output_directory_is_one_clear_line(corpus, tmp_path, finished_run):
    """Both entry points in one interpreter, as an unprivileged user (root ignores permissions)."""
    import shutil

    root = Path(__import__("tempfile").mkdtemp(prefix="lrc-ro-"))  # tmp_path is private to its owner
    try:
        for p in (root / "ro", root / "home"):
            p.mkdir()
        ckpt = shutil.copy(finished_run / "checkpoints" / "last.ckpt", root / "last.ckpt")
        data = shutil.copy(corpus, root / "corpus.jsonl")
        prefix: list[str] = []
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv")
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            os.chown(root / "home", 65534, 65534)
        for p in (root, root / "ro"):
            p.chmod(0o555)
        for p in (ckpt, data):
            Path(p).chmod(0o444)
        env = {**os.environ, "HOME": str(root / "home"), "LRC_CACHE": str(root / "home")}
        export_args = f"ckpt={ckpt} out={root / 'ro' / 'student'}"
        distill_args = cli_args(Path(data), root / "ro", f"paths.cache_dir={root / 'home'}")
        proc = subprocess.run([*prefix, sys.executable, "-c", TWO_CLIS, export_args, *distill_args],
                              capture_output=True, text=True, env=env, timeout=300)
    finally:
        for p in (root, root / "ro"):
            p.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 0 and "lrc-distill exit 2" in lines and "lrc-export exit 2" in lines, proc.stderr[-3000:]
    assert f"lrc-distill: error: cannot write to the output directory {root / 'ro'}: Permission denied" in lines
    assert f"lrc-export: error: cannot write {root / 'ro' / 'student'}: {root / 'ro'} is not writable" in lines
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- sweeps
def test_sweep_goes_on_after_a_failed_job_and_lists_them(corpus, tmp_path, capsys):
    """Hydra's basic launcher runs the jobs in order (0, 8) x (0.2, 0.5): the first two fail."""
    from omegaconf import OmegaConf

    args = [a for a in cli_args(corpus, tmp_path / "x") if not a.startswith(("hydra.run.dir", "summary."))]
    code, log = cli(capsys, "distill", "-m", *args, "student.rank=0,8", "loss.alpha=0.2,0.5", "trainer.max_steps=2",
                    "export.enabled=false", "validate_before=false", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 1, log[-3000:]
    jobs = {int(p.name): p for p in (tmp_path / "sweep").iterdir() if p.is_dir()}
    assert sorted(jobs) == [0, 1, 2, 3]
    for num in (0, 1):
        error = (jobs[num] / "error.txt").read_text()
        assert error.startswith("overrides: ") and "student.rank=0" in error.splitlines()[0]
        assert "error: CloneConfig.rank must be an integer in [1, 64]" in error
        assert not (jobs[num] / "metrics.json").exists()
    seen = set()
    for num in (2, 3):
        cfg = OmegaConf.load(jobs[num] / "config.yaml")
        seen.add((cfg.student.rank, cfg.loss.alpha))
        assert json.loads((jobs[num] / "metrics.json").read_text())["steps"] == 2
    assert seen == {(8, 0.2), (8, 0.5)}
    assert f"lrc-distill sweep: 2 of 4 job(s) finished, 2 failed ({tmp_path / 'sweep'})" in log
    lines = [line.split() for line in log.splitlines() if line.startswith("     ")]
    assert [(l[0], l[1]) for l in lines] == [("0", "failed"), ("1", "failed"), ("2", "finished"), ("3", "finished")]


# ------------------------------------------------------------------ processes: signals and kills
SIGNAL_STEPS = 30


def lrc_distill(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([str(BIN / "lrc-distill"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, **kw)


def _signal_overrides(corpus, *extra) -> list[str]:
    # a plain progress line every step (stdout is a pipe); a checkpoint every 3 steps
    return [f"trainer.max_steps={SIGNAL_STEPS}", "callbacks.checkpoint.every_n_train_steps=3",
            "callbacks.progress.print_every_n_steps=1", "validate_before=false", "export.enabled=false",
            "trainer.val_check_interval=10", "logger=none", *extra]


def _run_until(proc: subprocess.Popen, step: int, sig: int | None) -> tuple[int, str]:
    """Read the run's output until its progress line of ``step``, then send ``sig`` (if any) and wait."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if sig is not None and line.startswith(f"step {step}/{SIGNAL_STEPS} "):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


def test_a_sweep_stopped_by_a_signal_then_a_kill_resumes_to_the_uninterrupted_weights(corpus, tmp_path):
    """A two-job sweep (seeds 0, 1), stopped twice and rerun after each with the same command and
    ckpt_path=auto: SIGTERM during job 0 (graceful: job 0 checkpoints the step in flight, the sweep
    stops with status 130 and job 1 never starts), then SIGKILL in the middle of job 0's checkpoint
    write (the previous checkpoint must survive). Job 0 ends with exactly the weights of an
    uninterrupted run, and job 1 runs whole. (SIGINT takes SIGTERM's path:
    test_both_signals_take_the_graceful_path.)"""
    args = [a for a in cli_args(corpus, tmp_path / "x", *_signal_overrides(corpus)) if not a.startswith("hydra.run.dir")]
    sweep_dir = tmp_path / "sweep"
    sweep = ["-m", *args, "seed=0,1", f"hydra.sweep.dir={sweep_dir}", "ckpt_path=auto"]
    job0 = sweep_dir / "0"
    last = job0 / "checkpoints" / "last.ckpt"

    code, out = _run_until(lrc_distill(sweep), 4, signal.SIGTERM)
    assert code == 130, out[-3000:]
    assert "interrupted: checkpoint written" in out
    assert "lrc-distill: sweep stopped: job 0 was interrupted" in out
    assert not (sweep_dir / "1").exists()
    assert json.loads((job0 / "metrics.json").read_text())["interrupted"] is True
    _, stopped_at = _state(last)
    assert 4 <= stopped_at < SIGNAL_STEPS  # the step in flight when the signal came, or one after

    kill_at = (stopped_at // 3 + 2) * 3  # the second periodic checkpoint after the resume
    assert kill_at < SIGNAL_STEPS
    code, out = _run_until(lrc_distill([*sweep, f"+callbacks.kill={{_target_:cli_faults.KillDuringSave,step:{kill_at}}}"]),
                           kill_at, None)
    assert code == -signal.SIGKILL, out[-3000:]
    state, step = _state(last)  # loads: the previous checkpoint, complete
    assert step == kill_at - 3 and _finite(state)
    (partial,) = last.parent.glob(".last.ckpt.tmp-*")  # the interrupted write went beside it
    assert 0 < partial.stat().st_size
    assert not (sweep_dir / "1").exists()

    code, out = _run_until(lrc_distill(sweep), SIGNAL_STEPS, None)
    assert code == 0, out[-3000:]
    assert not partial.exists()
    for job in ("0", "1"):
        assert json.loads((sweep_dir / job / "metrics.json").read_text())["steps"] == SIGNAL_STEPS
    # its log (a pipe, not a terminal) has a plain progress line per step, none of Lightning's "Epoch 0/-2"
    assert re.search(rf"^step {SIGNAL_STEPS}/{SIGNAL_STEPS} \(100%\) \| loss \d+\.\d{{4}} \| [\d,]+ tokens/s \| "
                     r"elapsed \d+:\d\d:\d\d \| ETA 0:00:00$", out, re.M), out[-2000:]
    assert "Epoch" not in out
    state, step = _state(last)
    # the same job without interruptions, in this process
    ref = tmp_path / "ref"
    run(compose_cfg(tiny_overrides(corpus, ref, *_signal_overrides(corpus), "seed=0")))
    expected, expected_step = _state(ref / "checkpoints" / "last.ckpt")
    assert step == expected_step == SIGNAL_STEPS
    assert set(state) == set(expected)
    for k in state:
        assert torch.equal(state[k], expected[k]), k


def test_both_signals_take_the_graceful_path(monkeypatch):
    """GracefulShutdown answers SIGINT and SIGTERM with one handler while training (a checkpoint of
    the step in flight, then a stop), a second SIGINT stops at once, and the previous handlers
    come back when training ends."""
    from types import SimpleNamespace

    from lrc.training.callbacks import GracefulShutdown

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    saved = []
    trainer = SimpleNamespace(max_steps=10, global_step=3, fast_dev_run=False, should_stop=False,
                              save_checkpoint=saved.append)
    for first in (signal.SIGINT, signal.SIGTERM):
        cb = GracefulShutdown("/nonexistent")
        cb.on_train_start(trainer, None)
        try:
            handler = signal.getsignal(signal.SIGINT)
            assert signal.getsignal(signal.SIGTERM) == handler and handler not in before.values()
            cb.on_train_batch_end(trainer)
            assert not saved and not trainer.should_stop  # no signal yet, not the final step
            handler(first, None)
            assert cb.interrupted
            cb.on_train_batch_end(trainer)
            assert saved == [cb.path] and trainer.should_stop
            with pytest.raises(KeyboardInterrupt):  # Ctrl+C again: at once
                handler(signal.SIGINT, None)
        finally:
            cb.on_train_end(trainer, None)
        assert {sig: signal.getsignal(sig) for sig in before} == before
        saved.clear()
        trainer.should_stop = False


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


def test_summary_answer_min_new_tokens(tmp_path):
    """summary.min_new_tokens: a student whose every first choice ends its turn answers '' greedily,
    and with min_new_tokens=k says k tokens first."""
    from transformers import AutoTokenizer

    from lrc.cli.distill import greedy_answer
    from lrc.teachers import load_teacher

    model, tok = load_teacher("tiny-llama")
    # a student that can say nothing but end its turn (its saved generation config suppresses the rest)
    model.generation_config.suppress_tokens = [i for i in range(model.config.vocab_size) if i != tok.eos_token_id]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert greedy_answer(tmp_path, "hello", max_new_tokens=6) == ""
    answer = greedy_answer(tmp_path, "hello", max_new_tokens=6, min_new_tokens=4)
    assert answer != "" and len(AutoTokenizer.from_pretrained(tmp_path)(answer, add_special_tokens=False)["input_ids"]) >= 1
