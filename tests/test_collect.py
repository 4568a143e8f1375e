"""Every run's metrics.json and curves.csv, and lrc-collect: runs -> tables and figures."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from test_cli import BIN, cli, compose_cfg, tiny_overrides, write_corpus

from lrc.analysis import collect as C
from lrc.analysis.curves import best_validation, read_curves, validation_points
from lrc.cli.collect import main as collect_main
from lrc.cli.distill import run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")


def csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["variant"]: r for r in csv.DictReader(f)}


def val_ce_column(curves: Path) -> list[float]:
    with curves.open(newline="") as f:
        return [float(r["val/ce"]) for r in csv.DictReader(f) if r["val/ce"]]


def assert_png(path: Path) -> None:
    """A real PNG with a drawing in it: signature, a plot-sized canvas, many colours."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, (path, len(data))
    with Image.open(path) as im:
        assert im.width >= 400 and im.height >= 300
        assert len(set(im.convert("RGB").getdata())) > 50  # not a blank canvas


# --------------------------------------------------------------------- hand-made run dirs
def make_run(d: Path, *, overrides=(), seed=0, ce=None, best=None, status="finished", curves=None,
             config=None, wall=10.0, **metrics) -> Path:
    """A run directory as lrc-distill writes it; ``curves`` is a list of (tokens, wall_s, val/ce)."""
    d.mkdir(parents=True)
    if config is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    if ce is not None or status != "finished":
        summary = {"status": status, "method": "lrc", "seed": seed, "overrides": [*overrides, f"seed={seed}"],
                   "tokens_seen": 1000, "wall_time_s": wall, "wall_time_total_s": wall,
                   "params": {"trainable": 100, "deployed": 300}, **metrics}
        if ce is not None:
            summary["val"] = {"ce": ce, "teacher_ce": 3.0, "kl": 0.5, "top1_agreement": 0.25}
            summary["val_best"] = {"ce": ce if best is None else best}
        (d / "metrics.json").write_text(json.dumps(summary))
    if curves is not None:
        lines = ["step,tokens_seen,wall_s,train/loss,val/ce"]
        lines += [f"{i},{t},{w},,{v}" for i, (t, w, v) in enumerate(curves)]
        (d / "curves.csv").write_text("\n".join(lines) + "\n")
    return d


def test_mean_std_against_hand_computation():
    mean, std, n = C.mean_std([1.0, 2.0, 4.0])
    assert n == 3 and mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert C.mean_std([2.5]) == (2.5, None, 1)  # one seed: no std
    assert C.mean_std([]) == (None, None, 0)
    assert C.mean_std([1.0, None, float("nan"), 3.0]) == (2.0, math.sqrt(2), 2)


def test_two_seeds_grouped_failed_and_unfinished_jobs_listed(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # Hydra's file beside the job directories
    make_run(sweep / "0", overrides=["student.rank=8"], seed=0, ce=5.0, best=4.9, wall=10.0)
    make_run(sweep / "1", overrides=["student.rank=8"], seed=1, ce=5.5, best=5.25, wall=14.0)
    make_run(sweep / "2", overrides=["student.rank=16"], seed=0, ce=4.0, wall=7.0)
    (sweep / "3").mkdir()  # the other helper's error.txt of a failed sweep job
    (sweep / "3" / "error.txt").write_text(
        "overrides: student.rank=999\nerror: rank must be in [1, 64]\nTraceback...\n")
    make_run(sweep / "4", config={"seed": 0, "student": {"rank": 32}})  # started, never finished
    (sweep / "5").mkdir()  # died before writing anything
    make_run(sweep / "6", overrides=["student.rank=8"], seed=2, status="interrupted", interrupted=True, steps=3)
    make_run(sweep / "7", overrides=["student.rank=8"], seed=3, status="failed", error="non-finite loss at step 2")
    (sweep / "8").mkdir()
    (sweep / "8" / "metrics.json").write_text("{ not json")

    collect_main([str(sweep)])
    out = sweep / "collected"
    rows = csv_rows(out / "results.csv")
    assert set(rows) == {"student.rank=8", "student.rank=16"}  # common overrides and seeds left out of names
    r8, r16 = rows["student.rank=8"], rows["student.rank=16"]
    assert r8["n"] == "2" and r8["seeds"] == "0 1"
    assert float(r8["val_ce_mean"]) == pytest.approx((5.0 + 5.5) / 2)
    assert float(r8["val_ce_std"]) == pytest.approx(abs(5.5 - 5.0) / math.sqrt(2))  # ddof=1 for two values
    assert float(r8["best_val_ce_mean"]) == pytest.approx(5.075)
    assert float(r8["best_val_ce_std"]) == pytest.approx(0.35 / math.sqrt(2))
    assert float(r8["wall_s_mean"]) == 12.0 and float(r8["wall_s_std"]) == pytest.approx(math.sqrt(8))
    assert float(r8["tokens_mean"]) == 1000 and float(r8["tokens_std"]) == 0
    assert r16["n"] == "1" and float(r16["val_ce_mean"]) == 4.0 and r16["val_ce_std"] == ""
    md = (out / "results.md").read_text()
    assert "5.2500 ± 0.3536" in md and "4.0000 ± -" in md
    failed = md.split("## Failed or unfinished")[1]
    for job, text in [("3", "failed (rank must be in [1, 64])"), ("4", "unfinished (no metrics.json)"),
                      ("5", "unfinished (nothing written"), ("6", "interrupted (interrupted at step 3)"),
                      ("7", "failed (non-finite loss at step 2)"), ("8", "failed (unreadable")]:
        assert f"{sweep / job}: {text}" in failed, (job, failed)
    assert f"{sweep / '0'}:" not in failed
    # no curves.csv in these runs and no term variants: no figures, and a note says why
    assert not list(out.glob("*.png"))
    assert "no val/ce curve against training tokens" in md


def test_grouping_from_resolved_configs_and_group_by(tmp_path):
    """Runs without recorded overrides (the Python API) group by config differences; seeds and
    paths inside the run's own directory never separate variants."""
    def cfg(d, rank, alpha, seed):
        return {"seed": seed, "student": {"rank": rank, "seed": seed}, "loss": {"alpha": alpha},
                "paths": {"output_dir": str(d)}, "callbacks": {"ckpt": {"dirpath": f"{d}/checkpoints"}}}

    runs = []
    for i, (rank, alpha, seed, ce) in enumerate([(8, 0.2, 0, 5.0), (8, 0.2, 1, 6.0), (8, 0.5, 0, 4.0),
                                                 (16, 0.2, 0, 3.0)]):
        d = tmp_path / "runs" / f"r{i}"
        make_run(d, seed=seed, ce=ce, config=cfg(d, rank, alpha, seed))
        runs.append(C.load_run(d))
    for r in runs:
        r.overrides = []  # as written by the Python API
    variants = C.group_variants(runs)
    assert [(v.name, len(v.runs)) for v in variants] == [
        ("loss.alpha=0.2 student.rank=8", 2), ("loss.alpha=0.5 student.rank=8", 1),
        ("loss.alpha=0.2 student.rank=16", 1)]
    by_rank = C.group_variants(runs, ["student.rank"])
    assert [(v.name, [r.metrics["val"]["ce"] for r in v.runs]) for v in by_rank] == [
        ("student.rank=8", [5.0, 6.0, 4.0]), ("student.rank=16", [3.0])]
    row = C.summary_rows(by_rank)[0]
    assert row["val_ce_mean"] == 5.0 and row["val_ce_std"] == 1.0
    out = tmp_path / "out"
    collect_main([str(tmp_path / "runs"), "--out", str(out), "--group-by", "student.rank"])
    assert set(csv_rows(out / "results.csv")) == {"student.rank=8", "student.rank=16"}


def test_curve_figures_and_removed_term_chart(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep / "a0", seed=0, ce=5.0, curves=[(0, 0.0, 6.0), (100, 2.0, 5.5), (200, 4.0, 5.0)])
    make_run(sweep / "a1", seed=1, ce=4.6, curves=[(0, 0.0, 6.2), (100, 3.0, 5.1), (200, 6.0, 4.6)])
    make_run(sweep / "g0", overrides=["loss.term_weights.gate=0"], ce=5.4, curves=[(0, 0.0, 6.0), (200, 4.0, 5.4)])
    make_run(sweep / "qk", overrides=["loss.term_weights.q=0.0", "loss.term_weights.k=0"], ce=5.2,
             curves=[(0, 0.0, 6.0), (200, 4.0, 5.2)])
    variants = C.group_variants([C.load_run(d) for d in C.find_run_dirs([sweep])])
    assert [v.name for v in variants] == ["default", "loss.term_weights.gate=0",
                                         "loss.term_weights.q=0.0 loss.term_weights.k=0"]
    base = variants[0].runs
    tokens = C.curve_series(base, "val/ce", "tokens_seen")
    assert tokens["x"] == [0, 100, 200]
    assert tokens["mean"] == pytest.approx([6.1, 5.3, 4.8])
    assert tokens["std"] == pytest.approx([0.2 / math.sqrt(2), 0.4 / math.sqrt(2), 0.4 / math.sqrt(2)])
    assert C.curve_series(base, "val/ce", "wall_s")["x"] == [0.0, 2.5, 5.0]  # mean wall time of the seeds
    assert C.curve_series(variants[1].runs)["std"] == [None, None]
    bars = C.removed_term_bars(variants)
    assert [(b["label"], b["mean"], b["n"]) for b in bars] == [
        ("all terms", pytest.approx(4.8), 2), ("w/o q+k", 5.2, 1), ("w/o gate", 5.4, 1)]

    out = tmp_path / "out"
    collect_main([str(sweep), "--out", str(out)])
    figures = ["val_ce_vs_tokens.png", "val_ce_vs_wall_time.png", "val_ce_by_removed_term.png"]
    for name in figures:
        assert_png(out / name)
        assert f"]({name})" in (out / "results.md").read_text()
    # variants that do not switch terms off: no removed-term chart (and none left from before)
    make_run(tmp_path / "ranks" / "r8", overrides=["student.rank=8"], ce=5.0, curves=[(0, 0.0, 6.0), (10, 1.0, 5.0)])
    make_run(tmp_path / "ranks" / "r16", overrides=["student.rank=16"], ce=4.0, curves=[(0, 0.0, 6.0), (10, 1.0, 4.0)])
    collect_main([str(tmp_path / "ranks"), "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.png")) == figures[:2]
    assert "removed clone term" not in (out / "results.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["{tmp}/nope"], "is not a directory"),
    (["{tmp}/empty"], "holds no run directory"),
    (["{tmp}/runs", "--metric", "train/loss"], "--metric must be a validation metric"),
    (["{tmp}/runs", "--group-by", "student.rnak"], "--group-by key 'student.rnak' is in no run's config"),
    (["{tmp}/runs", "--baseline", "method=kd"], "--baseline 'method=kd' is not a variant here; the variants are: 'default'"),
])
def test_collect_bad_arguments_fail_before_writing(tmp_path, capsys, args, message):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    make_run(tmp_path / "runs" / "0", ce=5.0, config={"student": {"rank": 8}})
    with pytest.raises(SystemExit) as err:
        collect_main([a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tokens_to_reach_by_hand():
    from lrc.analysis.efficiency import tokens_to_reach

    x, y = [0, 100, 200, 300], [8.0, 6.0, 5.0, 4.5]
    assert tokens_to_reach(x, y, 9.0) == 0.0       # already there at the start
    assert tokens_to_reach(x, y, 6.0) == 100.0     # exactly at a point
    assert tokens_to_reach(x, y, 5.5) == 150.0     # halfway between 6.0 (100) and 5.0 (200)
    assert tokens_to_reach(x, y, 4.6) == pytest.approx(280.0)  # 4/5 of the way from 5.0 to 4.5
    assert tokens_to_reach(x, y, 4.0) is None      # never within the curve
    # a curve that rises again: the first crossing counts
    assert tokens_to_reach([0, 10, 20, 30], [5.0, 3.0, 6.0, 2.0], 4.0) == 5.0
    with pytest.raises(ValueError, match="differ in length"):
        tokens_to_reach([0, 1], [1.0], 0.5)


def test_token_efficiency_table_through_lrc_collect(tmp_path):
    from lrc.analysis.efficiency import token_efficiency

    lrc = {"x": [0, 100, 200], "mean": [8.0, 6.0, 5.0]}
    kd = {"x": [0, 100, 200, 300, 400], "mean": [9.0, 7.0, 6.5, 6.0, 5.5]}
    rows = token_efficiency(lrc, kd)
    # 6.0 is reached by kd at 300 tokens (3x of 100); 5.0 never within 400 tokens: > 400/200 = 2x
    assert [(r["tokens"], r["baseline_tokens"], r["ratio"], r["lower_bound"]) for r in rows] == [
        (100, 300.0, 3.0, False), (200, None, 2.0, True)]
    sweep = tmp_path / "sweep"
    make_run(sweep / "0", overrides=["method=lrc"], ce=5.0, curves=[(0, 0.0, 8.0), (100, 1.0, 6.0), (200, 2.0, 5.0)])
    make_run(sweep / "1", overrides=["method=kd"], ce=5.5,
             curves=[(0, 0.0, 9.0), (100, 1.0, 7.0), (200, 2.0, 6.5), (300, 3.0, 6.0), (400, 4.0, 5.5)])
    out = tmp_path / "out"
    collect_main([str(sweep), "--out", str(out), "--baseline", "method=kd"])
    report = (out / "results.md").read_text()
    assert "## Token efficiency" in report and "### `method=lrc`" in report
    assert "| 100 | 6.0000 | 300 | 3.00 |" in report and "| 200 | 5.0000 | never | > 2.00 |" in report


# ------------------------------------------------------------------------------ curves.csv
def test_best_validation_and_read_curves(tmp_path):
    rows = [{"step": 0, "tokens_seen": 0, "wall_s": 0.0, "val/ce": 5.0, "val/kl": 1.0},
            {"step": 0, "tokens_seen": 64, "wall_s": 1.0, "train/loss": 9.0},
            {"step": 1, "tokens_seen": 64, "wall_s": 1.5, "val/ce": 4.0, "val/kl": 0.5},
            {"step": 3, "tokens_seen": 128, "wall_s": 3.0, "val/ce": 4.0, "val/kl": 0.4},
            {"step": 4, "tokens_seen": 128, "wall_s": 3.5, "val/ce": 4.0, "val/kl": 0.4}]  # final validate
    assert [p["tokens_seen"] for p in validation_points(rows)] == [0, 64, 128]
    assert best_validation(rows) == {"ce": 4.0, "kl": 0.5, "step": 1, "tokens_seen": 64, "wall_s": 1.5}  # earliest tie
    assert best_validation(rows[1:2]) is None
    bad = tmp_path / "curves.csv"
    bad.write_text("step,tokens_seen,wall_s,val/ce\n0,0,0.0,5.0\n1,64,1.0,oops\n")
    with pytest.raises(ValueError, match=r"curves.csv, line 3: column 'val/ce' holds 'oops'"):
        read_curves(bad)


def test_curves_logger_appends_on_resume_and_keeps_the_clock(tmp_path):
    from lrc.training.curves import CurvesLogger

    path = tmp_path / "run" / "curves.csv"
    tokens = [0]
    log = CurvesLogger(path, tokens=lambda: tokens[0])
    log.log_metrics({"val/ce": torch.tensor(5.0)}, step=0)  # before training: wall 0
    log.start()
    tokens[0] = 64
    log.log_metrics({"train/loss": 2.0, "train_layers/clone/q/0": 1.0, "loss": 3.0}, step=0)  # only train/ and val/
    tokens[0] = 128
    log.log_metrics({"train/loss": 1.5, "train/kl": 0.1}, step=1)  # a new column rewrites the header
    log.log_metrics({"epoch": 0.0}, step=1)  # nothing to write
    first = read_curves(path)
    assert [(r["step"], r["tokens_seen"]) for r in first] == [(0, 0), (0, 64), (1, 128)]
    assert first[0] == {"step": 0, "tokens_seen": 0, "wall_s": 0.0, "val/ce": 5.0}
    assert "train/kl" not in first[1] and first[2]["train/kl"] == pytest.approx(0.1)
    assert path.read_text().splitlines()[0] == "step,tokens_seen,wall_s,train/kl,train/loss,val/ce"
    resumed = CurvesLogger(path, tokens=lambda: 192)
    resumed.start()
    resumed.log_metrics({"train/loss": 1.0}, step=2)
    rows = read_curves(path)
    assert len(rows) == 4 and rows[:3] == first
    assert rows[3]["wall_s"] >= first[2]["wall_s"] and rows[3]["tokens_seen"] == 192


# ---------------------------------------------------------------------------- real runs
class SignalAt(L.Callback):
    """Test helper: send this process SIGTERM after training step ``step`` (lrc-distill's
    GracefulShutdown then checkpoints and stops)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_metrics_json_and_curves_of_an_interrupted_then_resumed_run(corpus, tmp_path):
    out = tmp_path / "run"
    extra = ["logger=none", "trainer.max_steps=6", "trainer.val_check_interval=2",
             "callbacks.checkpoint.every_n_train_steps=100"]
    first = run(compose_cfg(tiny_overrides(corpus, out, *extra, "export.enabled=false",
                                           "+callbacks.stop._target_=test_collect.SignalAt", "+callbacks.stop.step=3")))
    assert first["status"] == "interrupted" and first["steps"] == 4
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["val_best"]["ce"] == round(min(val_ce_column(out / "curves.csv")), 4)  # before training, step 2
    assert C.load_run(out).status == "interrupted"
    first_wall = max(r["wall_s"] for r in read_curves(out / "curves.csv"))

    run(compose_cfg(tiny_overrides(corpus, out, *extra, "ckpt_path=last")))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["status"] == "finished" and saved["method"] == "lrc" and saved["seed"] == 0
    assert saved["overrides"] == []  # the Python API: no Hydra command line
    assert not (out / "csv").exists() and not (out / "tensorboard").exists()  # logger=none, curves anyway
    rows = read_curves(out / "curves.csv")
    assert [r["tokens_seen"] for r in rows if "train/loss" in r] == [64 * i for i in range(1, 7)]
    walls = [r["wall_s"] for r in rows]
    assert walls == sorted(walls)  # the resumed run's clock continues from the first one's
    assert saved["wall_time_total_s"] == pytest.approx(first_wall + saved["wall_time_s"], abs=0.15)
    assert saved["val_best"]["ce"] == round(min(val_ce_column(out / "curves.csv")), 4)  # both segments
    assert saved["val_best"]["ce"] <= saved["val"]["ce"]
    # parameter counts: the checkpoint holds exactly the trainable tensors; the export is a plain model
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["params"]["trainable"] == sum(v.numel() for v in ckpt["state_dict"].values())
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert saved["params"]["deployed"] == sum(p.numel() for p in student.parameters())


def test_sweep_through_the_cli_collected_into_its_table(corpus, tmp_path, capsys, monkeypatch):
    """A two-job ``lrc-distill -m`` sweep on a tiny teacher (its entry point in this process), then
    the ``lrc-collect`` command: the collected table holds exactly the jobs' metrics.json values,
    and the jobs differ by a removed term, so the chart appears."""
    args = [a for a in tiny_overrides(corpus, tmp_path / "x") if not a.startswith(("paths.output_dir", "summary."))]
    sweep = tmp_path / "sweep"
    monkeypatch.setenv("LRC_NO_PROGRESS", "1")
    code, log = cli(capsys, "distill", "-m", *args, "loss.term_weights.q=1.0,0.0", "trainer.max_steps=2",
                    "trainer.val_check_interval=1", "export.enabled=false", "logger=none", f"hydra.sweep.dir={sweep}")
    assert code == 0, log[-3000:]
    jobs = {}
    for job in sorted(sweep.glob("[0-9]*")):
        m = json.loads((job / "metrics.json").read_text())
        q = next(o for o in m["overrides"] if o.startswith("loss.term_weights.q="))
        assert m["status"] == "finished" and m["method"] == "lrc" and m["seed"] == 0 and m["tokens_seen"] == 128
        assert m["val_best"]["ce"] == round(min(val_ce_column(job / "curves.csv")), 4)
        jobs[q] = m
    assert set(jobs) == {"loss.term_weights.q=1.0", "loss.term_weights.q=0.0"}

    p = subprocess.run([str(BIN / "lrc-collect"), str(sweep)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = sweep / "collected"
    assert "| `loss.term_weights.q=0.0` | 1 |" in p.stdout
    rows = csv_rows(out / "results.csv")
    assert set(rows) == set(jobs)
    for name, m in jobs.items():
        row = rows[name]
        assert row["n"] == "1" and row["seeds"] == "0"
        expected = {"val_ce": m["val"]["ce"], "best_val_ce": m["val_best"]["ce"], "teacher_ce": m["val"]["teacher_ce"],
                    "top1_agreement": m["val"]["top1_agreement"], "kl": m["val"]["kl"], "tokens": m["tokens_seen"],
                    "wall_s": m["wall_time_total_s"], "trainable_params": m["params"]["trainable"],
                    "deployed_params": m["params"]["deployed"]}
        for col, value in expected.items():
            assert float(row[f"{col}_mean"]) == value, col
            assert row[f"{col}_std"] == "", col
    for name in ("val_ce_vs_tokens.png", "val_ce_vs_wall_time.png", "val_ce_by_removed_term.png"):
        assert_png(out / name)
    assert "## Failed or unfinished\n\nnone" in (out / "results.md").read_text()
