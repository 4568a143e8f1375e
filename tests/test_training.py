"""DistillModule and schedules, on a tiny teacher with an in-memory data module."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lrc.training.module import DistillModule, NonFiniteLossError
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
    return DistillModule(**cfg)


def trainer(tmp_path, steps=4, **kw):
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=2,
        default_root_dir=tmp_path, **kw,
    )


def test_fit_trains_only_projections_and_logs(tmp_path):
    module = make_module()
    t = trainer(tmp_path)
    t.fit(module, datamodule=RandomTokens())
    m = t.callback_metrics
    for key in ("train/loss", "train/ce", "train/kl", "train/clone", "train/clone/gate", "train/lr",
                "train/grad_norm", "val/ce", "val/teacher_ce", "val/kl", "val/top1_agreement", "val/ppl"):
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
    ckpt = torch.load(path, weights_only=False)
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


@pytest.mark.parametrize(
    "optim,match",
    [({"lr": -1.0}, "optim.lr must be >= 0"), ({"name": "sgd"}, "optim.name"), ({"schedule": "step"}, "optim.schedule")],
)
def test_bad_optim(optim, match):
    with pytest.raises(ValueError, match=match):
        make_module(optim=optim)
