"""callbacks.eval (lrc.training.eval_callback.PeriodicEval): multiple-choice accuracy of the student
during distillation, on a tiny teacher."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from test_cli import cli, cli_args, compose_cfg, corpus, tiny_overrides  # noqa: F401 - corpus is a fixture
from test_training import TEACHER, RandomTokens, trainer

from lrc.cli.common import ConfigError
from lrc.cli.distill import run
from lrc.eval.mc import read_mc_file, score_items
from lrc.methods.kd import KDModule
from lrc.methods.lrc import LRCModule
from lrc.training import eval_callback
from lrc.training.eval_callback import PeriodicEval, load_tasks, student_lm

ITEMS = [
    {"context": "the cat sat on the", "choices": ["mat", "sky", "tree"], "gold": 0},
    {"context": "one two three", "choices": ["four", "ten"], "gold": 0},
    {"context": "red green", "choices": ["blue", "loud", "slow", "up"], "gold": 2},
    {"context": "a b c", "choices": ["d", "zz"], "gold": 1},
    {"context": "hello", "choices": ["world", "there", "again"], "gold": 1},
    {"context": "to be or not", "choices": ["to be", "maybe"], "gold": 0},
]


def write_mc_items(path: Path) -> Path:
    """:data:`ITEMS` as a multiple-choice JSON-lines file."""
    path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return path


@pytest.fixture
def mc_file(tmp_path) -> Path:
    return write_mc_items(tmp_path / "toy.jsonl")


class Recorder(Logger):
    """Every ``log_metrics`` call: ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    name = "recorder"
    version = "0"

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


class Snapshots(PeriodicEval):
    """Keeps each evaluation's per-item log-likelihoods."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.lls: dict[int, list[list[float]]] = {}
        self.modes: list[bool] = []

    def evaluate(self, trainer, pl_module):
        metrics = super().evaluate(trainer, pl_module)
        self.lls[trainer.global_step] = [r["lls"] for r in self.last_scored["toy"]]
        self.modes.append(pl_module.model.training)
        return metrics


def direct_lls(module, tokenizer, items) -> list[list[float]]:
    """Summed log-probabilities of ``" " + choice`` after each context, one unpadded sequence at a
    time, from the student's own logits: the clone's ``student_logits``, a baseline's plain student."""
    out = []
    with torch.no_grad():
        for item in items:
            ctx = tokenizer.encode(item["context"])
            row = []
            for choice in item["choices"]:
                whole = tokenizer.encode(item["context"] + " " + choice)
                assert whole[:len(ctx)] == ctx
                ids = torch.tensor([whole[:-1]])
                if isinstance(module, LRCModule):
                    logits = module.model(ids).student_logits
                else:
                    logits = module.model.student(ids).logits
                logp = torch.log_softmax(logits[0].float(), -1)
                row.append(sum(float(logp[p - 1, whole[p]]) for p in range(len(ctx), len(whole))))
            out.append(row)
    return out


def accuracy(lls: list[list[float]], norm: bool = False) -> float:
    hits = 0
    for item, row in zip(ITEMS, lls):
        scores = [s / len(c) for s, c in zip(row, item["choices"])] if norm else row
        hits += max(range(len(scores)), key=lambda c: (scores[c], -c)) == item["gold"]
    return hits / len(ITEMS)


@pytest.mark.parametrize("method", [LRCModule, KDModule], ids=["lrc", "kd"])
def test_logged_accuracy_is_the_students_choice_at_steps_n_and_2n(tmp_path, mc_file, method):
    callback = Snapshots(every_n_steps=2, tasks=[str(mc_file)], max_items=len(ITEMS), batch_size=4)
    logger = Recorder()
    module = method(teacher=TEACHER, student={"rank": 16}, optim={"lr": 3e-2})
    # 2 micro-batches per optimizer step: the callback counts optimizer steps, not batches
    trainer(tmp_path, steps=4, accumulate_grad_batches=2, callbacks=[callback], logger=logger,
            limit_val_batches=0).fit(module, datamodule=RandomTokens(n=32))

    assert [s for s, _ in callback.history] == [2, 4]  # not at 0, 1, 3
    logged = [(s, m) for s, m in logger.calls if any(k.startswith("eval/") for k in m)]
    assert [s for s, _ in logged] == [2, 4]
    assert set(logged[-1][1]) == {"eval/toy/acc", "eval/toy/acc_norm"}

    # step 4 is the end of training: the student now is the one evaluated last
    module.model.eval()
    want = direct_lls(module, module.model.tokenizer, ITEMS)
    for got_row, want_row in zip(callback.lls[4], want):
        assert got_row == pytest.approx(want_row, rel=1e-4, abs=1e-4)
    assert logged[-1][1]["eval/toy/acc"] == accuracy(want)
    assert logged[-1][1]["eval/toy/acc_norm"] == accuracy(want, norm=True)
    # step 2 scored the student of step 2, not the final one
    assert max(abs(a - b) for r2, r4 in zip(callback.lls[2], callback.lls[4]) for a, b in zip(r2, r4)) > 1e-3
    assert callback.modes == [True, True]  # training mode restored after each evaluation


def test_at_start_also_evaluates_step_0_and_off_evaluates_nothing(tmp_path, mc_file):
    start = PeriodicEval(every_n_steps=3, tasks=[str(mc_file)], at_start=True)
    off = PeriodicEval(every_n_steps=0, tasks=["/not/read/when/off.jsonl"])
    trainer(tmp_path, steps=3, callbacks=[start, off], limit_val_batches=0).fit(
        LRCModule(teacher=TEACHER, student={"rank": 16}), datamodule=RandomTokens())
    assert [s for s, _ in start.history] == [0, 3]
    assert off.history == [] and not off.enabled


def test_task_names_files_and_counts_are_checked(tmp_path, mc_file, monkeypatch):
    from lrc.eval.mc import MCItem

    fake = (MCItem("c", ("a", "b"), 0),) * 3
    monkeypatch.setattr(eval_callback, "_pydoc_items", lambda n: fake[:n])
    tasks = load_tasks(["pydoc_mc", str(mc_file)], 2)
    assert tasks == {"pydoc_mc": list(fake[:2]), "toy": read_mc_file(mc_file)[:2]}
    with pytest.raises(ValueError, match="tasks: unknown task 'hellaswag'"):
        PeriodicEval(every_n_steps=1, tasks=["hellaswag"])
    with pytest.raises(FileNotFoundError, match="tasks: multiple-choice task file not found: .*no.jsonl"):
        PeriodicEval(every_n_steps=1, tasks=[str(tmp_path / "no.jsonl")])
    with pytest.raises(ValueError, match="two tasks are named 'toy'"):
        PeriodicEval(every_n_steps=1, tasks=[str(mc_file), str(mc_file)])
    with pytest.raises(ValueError, match="tasks is empty"):
        PeriodicEval(every_n_steps=1, tasks=[])
    for key, bad in (("every_n_steps", -1), ("every_n_steps", 1.5), ("every_n_steps", True), ("max_items", 0),
                     ("batch_size", 0)):
        with pytest.raises(ValueError, match=f"{key} must be an integer >= "):
            PeriodicEval(**{key: bad})


def test_a_module_without_a_student_forward_is_refused():
    with pytest.raises(ValueError, match="Linear exposes no student forward"):
        student_lm(torch.nn.Linear(2, 2))


BAD = [
    ({"every_n_steps": -1}, r"callbacks\.eval\.every_n_steps must be an integer >= 0, got -1"),
    ({"every_n_steps": 1.5}, r"callbacks\.eval\.every_n_steps must be an integer, got 1\.5"),
    ({"every_n_steps": "often"}, r"callbacks\.eval\.every_n_steps must be an integer, got 'often'"),
    ({"tasks": ["mmlu"]}, r"callbacks\.eval\.tasks: unknown task 'mmlu'"),
    ({"tasks": ["/no/such/task.jsonl"]},
     r"callbacks\.eval\.tasks: multiple-choice task file not found: /no/such/task\.jsonl"),
    ({"batch_size": 0}, r"callbacks\.eval\.batch_size must be an integer >= 1, got 0"),
]


def test_bad_eval_settings_are_refused_before_any_work(corpus, tmp_path, monkeypatch, mc_file):  # noqa: F811
    import lrc.teachers
    from omegaconf import OmegaConf

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(lrc.teachers, "load_teacher", no_teacher)
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text(mc_file.read_text() + json.dumps({"context": "x", "choices": ["a", "b"], "gold": 5}) + "\n")
    base = compose_cfg(tiny_overrides(corpus, tmp_path / "run", "callbacks.eval.every_n_steps=2"))
    row_error = rf"callbacks\.eval\.tasks: {bad_row}, line 7: field 'gold'"
    for change, match in [*BAD, ({"tasks": [str(bad_row)]}, row_error)]:
        cfg = base.copy()
        for key, value in change.items():
            OmegaConf.update(cfg, f"callbacks.eval.{key}", value, merge=False)
        with pytest.raises(ConfigError, match=match):
            run(cfg)
        assert not (tmp_path / "run").exists()


def test_lrc_distill_writes_eval_metrics_into_the_run_curves(corpus, tmp_path, capsys, mc_file):  # noqa: F811
    out = tmp_path / "run"
    code, text = cli(capsys, "distill", *cli_args(corpus, out, "callbacks.eval.every_n_steps=1", "trainer.max_steps=2",
                                                  f"callbacks.eval.tasks=['{mc_file}']", "callbacks.eval.batch_size=3",
                                                  "validate_before=false"))
    assert code == 0, text
    assert_eval_rows(out, mc_file, steps=[1, 2], tokens_per_step=2 * 32)  # batch 2 x 32 tokens


def assert_eval_rows(out: Path, mc_file: Path, steps: list[int], tokens_per_step: int) -> None:
    """``eval/toy/*`` in the run's ``curves.csv`` (and the csv logger's file) at ``steps``; the last
    one equal to the exported (final) student's, scored by lrc-eval's scorer."""
    rows = [r for r in csv.DictReader((out / "curves.csv").open()) if r.get("eval/toy/acc")]
    assert [int(r["step"]) for r in rows] == steps
    assert [int(r["tokens_seen"]) for r in rows] == [s * tokens_per_step for s in steps]
    logged = [r for r in csv.DictReader((out / "csv" / "metrics.csv").open()) if r.get("eval/toy/acc")]
    assert [float(r["eval/toy/acc"]) for r in logged] == [float(r["eval/toy/acc"]) for r in rows]
    # the last evaluation saw the final student: the export, scored by lrc-eval's scorer, agrees
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    scored = score_items(student, AutoTokenizer.from_pretrained(out / "student"), read_mc_file(mc_file))
    assert float(rows[-1]["eval/toy/acc"]) == pytest.approx(sum(s["acc"] for s in scored) / len(scored))
    assert float(rows[-1]["eval/toy/acc_norm"]) == pytest.approx(sum(s["acc_norm"] for s in scored) / len(scored))


# Under trainer=fsdp on 2 processes: test_distributed.py's FSDP run scores the same file (one
# 2-process run serves both).
