"""Multi-process training on CPUs (gloo, 2 processes) through the real lrc-distill: ``trainer=fsdp``
(FSDP2, sharded checkpoints; with activation checkpointing "full", then "student") and ``trainer=ddp``
give the numbers of one process for the same global batch (and callbacks.eval scores the sharded
student); a sharded checkpoint resumes on 1 and on 2 processes, a one-process checkpoint on 2 (the data
position in checkpoints is global, lrc/data/resume.py); lrc-export reads it without the teacher. Both
launches the README gives run: Lightning starting the second process, and torchrun.

The 2-process runs cost 20-30 s each on 2 CPU cores, so the end-to-end tests are marked slow; the
sharded-checkpoint reader's own checks run in one process and are fast."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import BIN, compose_cfg, tiny_overrides, write_corpus
from test_eval_callback import assert_eval_rows, write_mc_items

from lrc.cli.distill import run
from lrc.cli.export import export_checkpoint
from lrc.training.checkpoint_io import CheckpointError, load_checkpoint, read_sharded_tensors

#: one global batch of 4 sequences per step: 2 micro-batches on 1 process, 1 on each of 2
COMMON = ("global_batch_size=4", "optim.schedule=constant", "optim.warmup_ratio=0", "optim.lr=0.01",
          "validate_before=false", "callbacks.checkpoint.every_n_train_steps=2")
FSDP = ("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy.param_dtype=float32")
DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")
TERMS = ("train/loss", "train/ce", "train/kl", "train/clone", "train/clone/q", "train/clone/down")


def train_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` of the training rows of ``curves.csv``."""
    rows = {}
    for r in csv.DictReader((run_dir / "curves.csv").open()):
        if r.get("train/loss"):
            rows[int(r["step"])] = {k: float(r[k]) for k in TERMS}
    return rows


def two_processes(corpus: Path, out: Path, *extra: str, launcher: str = "lightning") -> None:
    """lrc-distill on 2 CPU processes, launched as the README says: by Lightning, which starts the
    second process once the first has set up (``launcher="lightning"``), or by ``torchrun``, which
    starts both at once (``"torchrun"``, as on each node of a multi-node run; its imports then
    overlap on the two cores)."""
    args = [f"hydra.run.dir={out}", *tiny_overrides(corpus, out, *COMMON, *extra)]
    env = {**os.environ, "LRC_NO_PROGRESS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    command = [str(BIN / "lrc-distill"), *args]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    # both processes write to these pipes: keep enough of stderr to hold the second one's traceback too
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-12000:]


def assert_same_rows(got: dict, want: dict, steps: range) -> None:
    for step in steps:
        for k in TERMS:
            assert got[step][k] == pytest.approx(want[step][k], rel=2e-5, abs=1e-6), (step, k)


def trainable(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The one-process reference (4 steps, in this process; its step-2 checkpoint is kept) and FSDP2
    on 2 processes stopped at step 2 (a sharded checkpoint), scoring a multiple-choice file at steps
    1 and 2 (callbacks.eval: no training number changes)."""
    tmp = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(tmp / "corpus.jsonl")
    ref = tmp / "ref"
    run(compose_cfg(tiny_overrides(corpus, ref, *COMMON, "callbacks.checkpoint.save_top_k=-1")))
    f2 = tmp / "fsdp"
    mc_file = write_mc_items(tmp / "toy.jsonl")
    # recomputing each layer whole in backward changes no number
    two_processes(corpus, f2, *FSDP, "trainer.max_steps=2", "trainer.strategy.activation_checkpointing=full",
                  "callbacks.eval.every_n_steps=1", f"callbacks.eval.tasks=['{mc_file}']")
    return corpus, ref, f2, train_rows(ref), mc_file


def resume_copy(src: Path, dst: Path, ckpt: str | None = None) -> Path:
    """A copy of run ``src`` to resume with ``ckpt_path=last``; ``ckpt`` (a file name in its
    checkpoints/) replaces last.ckpt."""
    shutil.copytree(src, dst)
    if ckpt is not None:
        shutil.copy(dst / "checkpoints" / ckpt, dst / "checkpoints" / "last.ckpt")
    (dst / "curves.csv").write_text("".join((src / "curves.csv").open().readlines()[:1]))  # keep only new rows
    return dst


def assert_same_trainable(run_dir: Path, ref: Path) -> None:
    final, got = trainable(ref / "checkpoints" / "last.ckpt"), trainable(run_dir / "checkpoints" / "last.ckpt")
    assert got.keys() == final.keys()
    for k in final:
        torch.testing.assert_close(got[k], final[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_resumes_and_exports(fsdp_run, tmp_path):
    corpus, ref, f2, want, mc_file = fsdp_run
    assert sorted(want) == [0, 1, 2, 3]
    # FSDP2 on 2 processes: the losses of one process, a sharded checkpoint without the teacher
    assert_same_rows(train_rows(f2), want, range(2))
    # callbacks.eval under FSDP: every process runs the same scoring forwards (each layer gathers
    # its shards), rank 0 logs, and the step-2 numbers are the exported (final) student's
    assert_eval_rows(f2, mc_file, steps=[1, 2], tokens_per_step=4 * 32)  # global batch 4 x 32 tokens
    ckpt = f2 / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file() and len(list(ckpt.glob("*.distcp"))) == 2
    index = read_sharded_tensors(ckpt, {"state_dict"})["state_dict"]
    assert index and not any("teacher" in k for k in index)

    # resumed on 2 processes started by torchrun: the uninterrupted one-process run's numbers and
    # weights (recomputing only the student stream of each layer changes no number either)
    two = resume_copy(f2, tmp_path / "resume2")
    two_processes(corpus, two, *FSDP, "ckpt_path=last", "trainer.strategy.activation_checkpointing=student",
                  launcher="torchrun")
    assert_same_rows(train_rows(two), want, range(2, 4))
    assert_same_trainable(two, ref)

    # lrc-export from the sharded checkpoint equals lrc-export of the same tensors from one file,
    # and the run's own export (trainable tensors gathered, teacher reloaded on rank 0)
    sharded = two / "checkpoints" / "last.ckpt"
    as_file = tmp_path / "as_file.ckpt"
    torch.save(load_checkpoint(sharded), as_file)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(export_checkpoint(sharded, tmp_path / "from_sharded"))
    b = AutoModelForCausalLM.from_pretrained(export_checkpoint(as_file, tmp_path / "from_file"))
    c = AutoModelForCausalLM.from_pretrained(two / "student")
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb, lc = a(ids).logits, b(ids).logits, c(ids).logits
    assert torch.equal(la, lb) and torch.equal(la, lc)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_ddp_on_two(fsdp_run, tmp_path):
    """The one-process run's step-2 checkpoint (2 micro-batches a step) resumed under DDP on 2
    processes started by torchrun (1 micro-batch each): the uninterrupted run's numbers and
    weights, so DDP gives the numbers of one process and each process starts at its half of the
    global data position."""
    corpus, ref, f2, want, _ = fsdp_run
    d2 = resume_copy(ref, tmp_path / "ddp", ckpt="step000002.ckpt")
    two_processes(corpus, d2, *DDP, "ckpt_path=last", launcher="torchrun")
    assert_same_rows(train_rows(d2), want, range(2, 4))
    assert_same_trainable(d2, ref)


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_one_process(fsdp_run, tmp_path):
    corpus, ref, f2, want, _ = fsdp_run
    one = resume_copy(f2, tmp_path / "resume1")
    run(compose_cfg(tiny_overrides(corpus, one, *COMMON, "ckpt_path=last")))  # trainer=cpu reads the shards whole
    assert_same_rows(train_rows(one), want, range(2, 4))
    assert_same_trainable(one, ref)


def test_sharded_checkpoint_reader_refuses_pickled_objects_and_missing_meta(tmp_path):
    """A sharded checkpoint may hold tensors only: an entry stored as a pickled object is refused
    before anything is unpickled, and a directory without meta.pt is named as incomplete."""
    import torch.distributed.checkpoint as dcp

    good, bad = tmp_path / "good", tmp_path / "bad"
    dcp.save({"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}}, storage_writer=dcp.FileSystemWriter(good))
    dcp.save({"state_dict": {"w": torch.zeros(2)}, "extra": {"obj": [1, 2]}}, storage_writer=dcp.FileSystemWriter(bad))
    assert torch.equal(read_sharded_tensors(good)["state_dict"]["w"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        read_sharded_tensors(bad)
    with pytest.raises(CheckpointError, match="without meta.pt"):
        load_checkpoint(good)
