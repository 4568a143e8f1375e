"""ResumableCSVLogger: keeps a resumed run's metrics.csv, and only rank 0 touches it."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lrc.training.loggers import ResumableCSVLogger


def test_rank_zero_keeps_the_old_rows_and_other_ranks_never_touch_the_file(tmp_path, monkeypatch):
    old = "step,train/loss\n0,1.5\n"
    logger = ResumableCSVLogger(str(tmp_path), name="", version="")
    (tmp_path / "metrics.csv").write_text(old)
    # another rank: a dummy writer, and the file is neither read nor replaced (rank 0 replaces it)
    def no_reading(self, *args, **kwargs):
        raise AssertionError(f"rank 1 read {self}")

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with monkeypatch.context() as m:
        m.setattr(Path, "read_text", no_reading)
        m.setattr(Path, "write_text", no_reading)
        logger.experiment.log_metrics({"x": 1.0}, step=1)
    assert (tmp_path / "metrics.csv").read_text() == old
    # rank 0: the old rows survive the writer's creation, and the header keys are kept
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    fresh = ResumableCSVLogger(str(tmp_path), name="", version="")
    writer = fresh.experiment
    assert (tmp_path / "metrics.csv").read_text() == old and writer.metrics_keys == ["step", "train/loss"]
