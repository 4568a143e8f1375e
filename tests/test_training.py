"""The training loop (LRCModule, the default method) and schedules, on a tiny teacher and in-memory data."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lrc.methods.lrc import LRCModule
from lrc.training.module import NonFiniteLossError
from lrc.training.schedules import lr_multiplier, warmup_steps_for

TEACHER = {"source": "tiny-llama", "dtype": "float32", "tiny": {"num_layers": 2}}


@pytest.mark.parametrize(
    "step,kind,expected",
    [
        (0, "linear", 1 / 3), (1, "linear", 2 / 3),  # warm-up of 2 steps
        (2, "linear", 1.0), (6, "linear", 0.5), (10, "linear", 0.0),
        (6, "cosine", 0.5), (4, "cosine", 0.5 * (1 + 0.7071067811865476)),
        (5, "wsd", 1.0), (8, "wsd", 1.0),
        (7, "constant", 1.0),
    ],
)
def test_lr_multiplier_closed_form(step, kind, expected):
    # total 10 steps, warm-up 2 -> decay span 8; wsd decays over the last 25% (progress 0.75 -> 1)
    assert lr_multiplier(step, 10, 2, kind, decay_ratio=0.25) == pytest.approx(expected)


def test_wsd_and_min_ratio():
    # span 8, decay over last 25% of progress = steps 8..10; at step 9 progress 0.875 -> halfway
    assert lr_multiplier(9, 10, 2, "wsd", decay_ratio=0.25) == pytest.approx(0.5)
    assert lr_multiplier(10, 10, 2, "linear", min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_steps_for(1000, 0.005) == 5 and warmup_steps_for(10, 0.0) == 0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, 10, 0, "step")


class RandomTokens(L.LightningDataModule):
    def __init__(self, n=16, length=12, batch_size=4, vocab=259, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, length), generator=g)
        self.batch_size = batch_size

    def _loader(self):
        return DataLoader([{"input_ids": x} for x in self.data], batch_size=self.batch_size)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def make_module(**kw):
    cfg = {"teacher": TEACHER, "student": {"rank": 16}, "loss": {"alpha": 0.5}, "optim": {"lr": 1e-2}}
    cfg.update(kw)
    return LRCModule(**cfg)


def trainer(tmp_path, steps=4, **kw):
    opts = dict(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=2,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**{**opts, **kw})


def test_fit_trains_only_projections_and_logs(tmp_path):
    module = make_module()
    t = trainer(tmp_path)
    t.fit(module, datamodule=RandomTokens())
    m = t.callback_metrics
    for key in ("train/loss", "train/ce", "train/kl", "train/clone", "train/clone/gate", "train/lr",
                "train/grad_norm_preclip", "val/ce", "val/teacher_ce", "val/kl", "val/top1_agreement", "val/ppl"):
        assert key in m, key
    assert m["val/ppl"].item() == pytest.approx(m["val/ce"].exp().item(), rel=1e-5)
    assert module.tokens_seen == 4 * 4 * 12
    # only trainable tensors go to the optimizer
    opt = t.optimizers[0]
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for _, p in module.clone.named_trainable())
    # linear decay ends at 0 (warm-up ceil(0.005 * 4) = 1 step)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_checkpoint_holds_only_trainable_and_resumes(tmp_path):
    module = make_module()
    t = trainer(tmp_path, steps=2)
    t.fit(module, datamodule=RandomTokens())
    path = tmp_path / "x.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    assert not any(".teacher." in k or "teacher_" in k for k in ckpt["state_dict"])
    assert ckpt["lrc"]["tokens_seen"] == 2 * 4 * 12
    assert ckpt["hyper_parameters"]["student"]["rank"] == 16
    # restoring into a fresh module gives the same trainable weights
    fresh = make_module()
    fresh.configure_model()
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"])
    for (n, a), (_, b) in zip(module.clone.named_trainable(), fresh.clone.named_trainable()):
        assert torch.equal(a, b), n


class StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_equals_uninterrupted(tmp_path):
    """Optimizer, scheduler, step and token count survive a checkpoint (at an epoch boundary
    here; mid-epoch data positions are the data module's job, tested with the CLI)."""
    full = make_module()
    trainer(tmp_path / "a", steps=8).fit(full, datamodule=RandomTokens())
    first = make_module()
    t1 = trainer(tmp_path / "b", steps=8, callbacks=[StopAt(4)])  # same schedule, stopped early
    t1.fit(first, datamodule=RandomTokens())
    assert t1.global_step == 4
    t1.save_checkpoint(tmp_path / "mid.ckpt")
    second = make_module()
    trainer(tmp_path / "c", steps=8).fit(second, datamodule=RandomTokens(), ckpt_path=tmp_path / "mid.ckpt")
    for (n, a), (_, b) in zip(full.clone.named_trainable(), second.clone.named_trainable()):
        assert torch.equal(a, b), n
    assert second.tokens_seen == full.tokens_seen


def test_non_finite_loss_names_step_and_term(tmp_path):
    module = make_module()
    module.configure_model()
    with torch.no_grad():
        module.clone.layers[1].proj["gate"].fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 0: offending terms \[.*'clone/gate/1'"):
        trainer(tmp_path, steps=2).fit(module, datamodule=RandomTokens())


def test_update_that_breaks_the_weights_stops_before_any_checkpoint(tmp_path):
    """The loss of step 2 is finite, its update is not: a checkpoint written every step must stop
    at step 2 (the weights before that update), and the error names the step."""
    from cli_faults import PoisonGradAt
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lrc.training.checkpoint_io import AtomicCheckpointIO
    from lrc.training.module import NonFiniteWeightsError

    module = make_module()
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=0, save_last=True)
    t = trainer(tmp_path, steps=4, callbacks=[PoisonGradAt(2), every_step], enable_checkpointing=True,
                plugins=[AtomicCheckpointIO()])
    with pytest.raises(NonFiniteWeightsError, match=r"after the optimizer update of step 2 \(\d+ of \d+: \["):
        t.fit(module, datamodule=RandomTokens())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 and all(bool(torch.isfinite(v).all()) for v in state["state_dict"].values())
    # and the save path itself refuses the broken weights
    with pytest.raises(NonFiniteWeightsError, match="no checkpoint written"):
        t.save_checkpoint(tmp_path / "broken.ckpt")
    assert not (tmp_path / "broken.ckpt").exists()


def test_export_refuses_non_finite_weights(tmp_path):
    module = make_module()
    module.configure_model()
    with torch.no_grad():
        module.clone.layers[1].proj["gate"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to export to .*: the merged student has non-finite weights in \["):
        module.clone.save_student(tmp_path / "student")
    assert not (tmp_path / "student").exists() and not list(tmp_path.iterdir())


def test_checkpoint_for_another_student_names_the_tensors(tmp_path):
    module = make_module()
    t = trainer(tmp_path, steps=1)
    t.fit(module, datamodule=RandomTokens())
    t.save_checkpoint(tmp_path / "r16.ckpt")
    other = make_module(student={"rank": 8})
    other.configure_model()
    with pytest.raises(ValueError, match=r"does not fit this student \(\d+ tensor\(s\): .*clone\.io\.proj_embed: "
                                         r"checkpoint \(64, 16\), this student \(64, 8\)"):
        other.on_load_checkpoint(torch.load(tmp_path / "r16.ckpt", weights_only=True))
    state = torch.load(tmp_path / "r16.ckpt", weights_only=True)
    state["state_dict"]["clone.io.proj_embed"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"holds non-finite tensors \['clone.io.proj_embed'\]"):
        module.on_load_checkpoint(state)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    module = make_module()
    t = trainer(path.parent, steps=1)
    t.fit(module, datamodule=RandomTokens())
    t.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    "kind,match",
    [
        ("missing", "does not exist"),
        ("empty", r"is empty \(0 bytes\): the write that made it never finished"),
        ("truncated", r"\([\d,]+ bytes\) is not a readable PyTorch checkpoint: it is truncated, corrupt"),
        ("random", r"\(1,000 bytes\) is not a readable PyTorch checkpoint"),
        ("corrupt", "is corrupt: "),
        ("foreign", "is a PyTorch file but not an lrc-distill checkpoint"),
    ],
)
def test_load_checkpoint_explains_a_bad_file(small_checkpoint, tmp_path, kind, match):
    import zipfile

    from lrc.training.checkpoint_io import CheckpointError, load_checkpoint

    data, path = small_checkpoint.read_bytes(), tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                         .numpy().tobytes())
    elif kind == "corrupt":  # a valid zip directory over damaged records
        with zipfile.ZipFile(small_checkpoint) as src, zipfile.ZipFile(path, "w") as dst:
            for item in src.infolist():
                dst.writestr(item, b"garbage" if item.filename.endswith("data.pkl") else src.read(item))
    elif kind == "foreign":
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_resume_through_lightning_never_unpickles_code(small_checkpoint, tmp_path):
    """Lightning's own resume path (Trainer.fit(ckpt_path=...)) reads through AtomicCheckpointIO."""
    from cli_faults import with_payload

    from lrc.training.checkpoint_io import AtomicCheckpointIO, CheckpointError

    marker = tmp_path / "code-ran"
    evil = with_payload(small_checkpoint, tmp_path / "evil.ckpt", marker)
    t = trainer(tmp_path, steps=2, plugins=[AtomicCheckpointIO()])
    with pytest.raises(CheckpointError, match="holds objects other than tensors and plain values"):
        t.fit(make_module(), datamodule=RandomTokens(), ckpt_path=evil)
    assert not marker.exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    from lrc.io import atomic_write

    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(target) as fh:
            fh.write(b"new, half")
            assert Path(fh.name).parent == tmp_path
            raise OSError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    with atomic_write(target) as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_progress_counts_optimizer_steps_over_epochs(tmp_path, capsys):
    """4 batches per epoch, accumulation 2, 6 optimizer steps = 3 epochs: one Rich bar "step" going
    to 6 on a terminal (not "Epoch 2/-2"), and plain lines at steps 2, 4, 6 in a log."""
    from lrc.training.callbacks import StepProgressBar

    for plain in (False, True):
        bar = StepProgressBar(print_every_n_steps=2, plain=plain)
        t = L.Trainer(accelerator="cpu", max_steps=6, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[bar],
                      default_root_dir=tmp_path)
        t.fit(make_module(), datamodule=RandomTokens())
        out = capsys.readouterr().out
        steps = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("step ") and " | " in line]
        if plain:
            assert steps == ["step 2/6 (33%)", "step 4/6 (67%)", "step 6/6 (100%)"]
            assert all(" | loss " in line and " tokens/s | elapsed " in line and "| ETA " in line
                       for line in out.splitlines() if line.startswith("step "))
        else:
            task = bar.train_progress_bar
            assert (task.description, task.total, task.completed) == ("step", 6, 6)
            assert len(bar.progress.tasks) == 1 and steps == [] and "Epoch" not in out and " 6/6 " in out


@pytest.mark.parametrize(
    "optim,match",
    [({"lr": -1.0}, "optim.lr must be >= 0"), ({"lr": float("inf")}, "optim.lr must be >= 0 and finite, got inf"),
     ({"name": "sgd"}, "optim.name"), ({"schedule": "step"}, "optim.schedule")],
)
def test_bad_optim(optim, match):
    with pytest.raises(ValueError, match=match):
        make_module(optim=optim)
