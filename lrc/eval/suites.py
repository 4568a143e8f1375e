"""Evaluation suites: which lm-evaluation-harness tasks, at how many shots, read with which metric.

A :class:`TaskSpec` names an lm-eval task (or group, ``mmlu``), the column the paper's tables give
it and the metric the paper reports for it (the key lm-eval writes is ``<metric>,<filter>``).

* ``paper``: the nine zero-shot tasks of the paper's Table 1 / Table 2 (acc_norm for ARC-C and
  LogiQA, acc otherwise); their mean is the table's "Avg.".
* ``safety``: ToxiGen (acc_norm), IFEval (instance-level loose accuracy), TruthfulQA MC2 (acc).
* ``fewshot``: WinoGrande, ARC-C, BoolQ and MMLU at 5 shots.
* ``offline``: nothing from the hub: held-out CE / perplexity / agreement / KL and the embedded
  multiple-choice task (:mod:`lrc.eval.pydoc_mc`), which need no download and no lm-eval.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HUB_SUITES", "SUITES", "TaskSpec", "suite_tasks"]


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: the lm-eval ``task`` name, the table's ``column``, the reported
    ``metric`` (a key of lm-eval's per-task results without its ``,filter`` suffix), the
    ``num_fewshot`` and the lm-eval ``filter`` the metric is read under."""

    task: str
    column: str
    metric: str = "acc"
    num_fewshot: int = 0
    filter: str = "none"

    @property
    def result_key(self) -> str:
        """The key of the metric in lm-eval's ``results[task]``, e.g. ``acc_norm,none``."""
        return f"{self.metric},{self.filter}"


PAPER = (
    TaskSpec("arc_easy", "ARC-E"),
    TaskSpec("arc_challenge", "ARC-C", "acc_norm"),
    TaskSpec("logiqa", "LogiQA", "acc_norm"),
    TaskSpec("commonsense_qa", "CSQA"),
    TaskSpec("piqa", "PIQA"),
    TaskSpec("winogrande", "WinoG"),
    TaskSpec("boolq", "BoolQ"),
    TaskSpec("sciq", "SciQ"),
    TaskSpec("mmlu", "MMLU"),
)
SAFETY = (
    TaskSpec("toxigen", "ToxiGen", "acc_norm"),
    TaskSpec("ifeval", "IFEval", "inst_level_loose_acc"),
    TaskSpec("truthfulqa_mc2", "TruthfulQA-MC2"),
)
FEWSHOT = (
    TaskSpec("winogrande", "WinoG", num_fewshot=5),
    TaskSpec("arc_challenge", "ARC-C", "acc_norm", num_fewshot=5),
    TaskSpec("boolq", "BoolQ", num_fewshot=5),
    TaskSpec("mmlu", "MMLU", num_fewshot=5),
)

#: Suites by name. ``offline`` has no lm-eval task: its work is done by lrc itself.
SUITES: dict[str, tuple[TaskSpec, ...]] = {"offline": (), "paper": PAPER, "safety": SAFETY, "fewshot": FEWSHOT}
#: Suites whose tasks download their data from the Hugging Face hub and need lm-eval.
HUB_SUITES = ("paper", "safety", "fewshot")
#: Suites whose table puts the mean of their tasks in an "Avg." column, as the paper does.
AVERAGED = ("paper",)


def suite_tasks(suite: str | None) -> tuple[TaskSpec, ...]:
    """The tasks of ``suite`` (``None``: none); ``ValueError`` naming the known suites otherwise."""
    if suite is None:
        return ()
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known suites: {', '.join(SUITES)}")
    return SUITES[suite]
