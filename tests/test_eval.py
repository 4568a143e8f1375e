"""lrc-eval: multiple-choice scoring against a direct log-likelihood computation (lrc's scorer and
lm-eval's), the held-out metrics against lrc-distill's own validation, the table renderer against
a hand-made result, and the bad-input checks. Tiny random models only."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from lrc.cli.common import CONF_DIR, ConfigError
from lrc.cli.eval import run
from lrc.eval.mc import MCItem, read_mc_file, score_items, summarize, write_mc_file

ITEMS = [  # contexts with and without trailing whitespace, choices of different lengths
    MCItem("Question: what is two plus two?\nAnswer:", ("4", "five", "22", "a dog"), 0),
    MCItem("The sky is", ("blue", "green", "made of cheese"), 2),
    MCItem("Python is a programming ", ("language", "snake", "x"), 1),
    MCItem("Which word is a colour?", ("red", "run", "rapidly", "rr"), 3),
    MCItem("1, 2, 3,", ("4", "5"), 0),
    MCItem("", ("hello", "hi"), 1),  # an empty context: lm-eval's prefix token
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A plain tiny Llama with the byte-level tiny tokenizer (one token per byte), saved like any model."""
    from lrc.teachers import tiny_teacher, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    tiny_teacher("llama", seed=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory) -> Path:
    return write_mc_file(ITEMS, tmp_path_factory.mktemp("tasks") / "toy_mc.jsonl")


def direct_scores(model_dir: Path, items) -> list[list[float]]:
    """Sum of log p(continuation byte | everything before it), computed by hand from the bytes:
    the tiny tokenizer's ids are the UTF-8 bytes; an empty context is the eos/bos token (256)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for item in items:
        ctx = list(item.context.rstrip().encode()) or [256]
        scores = []
        for choice in item.choices:
            cont = list((item.context[len(item.context.rstrip()):] + " " + choice).encode())
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            scores.append(sum(float(logp[len(ctx) + k - 1, tok]) for k, tok in enumerate(cont)))
        out.append(scores)
    return out


def accuracies(items, scores) -> tuple[float, float]:
    acc = [max(range(len(s)), key=lambda c: (s[c], -c)) == it.gold for it, s in zip(items, scores)]
    norm = [max(range(len(s)), key=lambda c: (s[c] / len(it.choices[c]), -c)) == it.gold for it, s in zip(items, scores)]
    return sum(acc) / len(items), sum(norm) / len(items)


def eval_cfg(model: Path, out: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=[f"model={model}", f"paths.output_dir={out}", *extra])


def test_lrc_scorer_equals_direct_loglikelihood(tiny_model_dir, mc_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    direct = direct_scores(tiny_model_dir, ITEMS)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    scored = score_items(model, AutoTokenizer.from_pretrained(tiny_model_dir), ITEMS, batch_size=3)
    for s, d in zip(scored, direct):
        assert s["lls"] == pytest.approx(d, abs=1e-4)
    acc, acc_norm = accuracies(ITEMS, direct)
    assert summarize(scored) == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "n": len(ITEMS)}
    # the same through lrc-eval (suite=null: only the local file), results.json and results.md written
    results = run(eval_cfg(tiny_model_dir, tmp_path / "out", "suite=null", f"mc_files=[{mc_file}]", "scorer=lrc"))
    task = results["tasks"]["toy_mc"]
    assert (task["acc"], task["acc_norm"], task["n"], task["scorer"]) == (pytest.approx(acc), pytest.approx(acc_norm), 6, "lrc")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["toy_mc"]["acc"] == pytest.approx(acc)
    assert f"| toy_mc | acc | {100 * acc:.2f} | 6 | 0 | lrc |" in (tmp_path / "out" / "results.md").read_text()


def test_lm_eval_scorer_equals_direct_loglikelihood_and_lrc_scorer(tiny_model_dir, mc_file, tmp_path):
    """The local task goes through lm-eval's own API (a custom task YAML: dataset_path json +
    data_files); its per-item log-likelihoods equal the direct computation, and on the embedded
    pydoc_mc items the two scorers agree item by item."""
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrc.eval import harness
    from lrc.eval.pydoc_mc import build_pydoc_items

    direct = direct_scores(tiny_model_dir, ITEMS)
    acc, acc_norm = accuracies(ITEMS, direct)
    results = run(eval_cfg(tiny_model_dir, tmp_path / "out", "suite=null", f"mc_files=[{mc_file}]", "scorer=lm_eval"))
    task = results["tasks"]["toy_mc"]
    assert (task["acc"], task["acc_norm"], task["scorer"]) == (pytest.approx(acc), pytest.approx(acc_norm), "lm_eval")

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pydoc = build_pydoc_items(max_items=8, seed=1)
    files = {"toy_mc": mc_file, "pydoc_mc": write_mc_file(pydoc, tmp_path / "pydoc_mc.jsonl")}
    for name, path in files.items():
        harness.mc_task_config(name, path, tmp_path / "yaml")
    manager = harness.task_manager([tmp_path / "yaml"], include_defaults=False)
    raw, samples = harness.run_tasks(model, tok, list(files), manager, batch_size=4, samples=True)
    for name, items in (("toy_mc", ITEMS), ("pydoc_mc", pydoc)):
        ours = score_items(model, tok, items, batch_size=4)
        theirs = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in samples[name]}
        for i, s in enumerate(ours):
            assert s["lls"] == pytest.approx(theirs[i], abs=1e-4), (name, i)
        mine = summarize(ours)
        assert (raw[name]["acc,none"], raw[name]["acc_norm,none"]) == (pytest.approx(mine["acc"]), pytest.approx(mine["acc_norm"]))
    toy = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in samples["toy_mc"]}
    for i, d in enumerate(direct):
        assert toy[i] == pytest.approx(d, abs=1e-4)


def test_pydoc_task_is_deterministic_and_well_formed():
    from lrc.eval.pydoc_mc import build_pydoc_items, module_candidates

    items = build_pydoc_items(max_items=50, seed=0)
    assert items == build_pydoc_items(max_items=50, seed=0) and len(items) == 50
    assert items != build_pydoc_items(max_items=50, seed=1)
    for it in items:
        assert len(it.choices) == 4 == len(set(it.choices)) and 0 <= it.gold < 4
        assert it.choices[it.gold] not in it.context.split('"')[1]  # the summary does not give the name away
    src = ('def _private():\n    """Hidden helper that is not public."""\n'
           'def short():\n    """Too short."""\n'
           'def named():\n    """Return the named thing for you."""\n'
           'def good(x):\n    """Return the first item of a list.\n\n    More text."""\n')
    assert module_candidates(src) == [("good", "Return the first item of a list.")]


# ------------------------------------------------------------------------------ offline default
WORDS = "the student copies the teacher through small projections while the teacher stays frozen".split()


def write_corpus(path: Path, n_docs: int = 40) -> Path:
    g = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for i in range(n_docs):
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (30,), generator=g)]
            f.write(json.dumps({"text": f"Document {i}. " + " ".join(words) + "."}) + "\n")
    return path


def test_offline_default_equals_lrc_distill_validation(tmp_path):
    """lrc-eval on an lrc-distill export, with the run's teacher (teacher.source=auto) and the same
    held-out data, gives the run's own final validation numbers; pydoc_mc is scored beside them."""
    from lrc.cli.distill import run as distill

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    data = ["data=local_jsonl", f"data.sources=[{{name:toy,kind:jsonl,path:'{corpus}'}}]", "data.seq_len=32",
            "data.batch_size=2", "data.val_fraction=0.2", "data.val_sequences=4"]
    run_dir = tmp_path / "run"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=[
            f"paths.output_dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}", "~experiment", "teacher=tiny_llama",
            "student.rank=16", *data, "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv",
            "summary.max_new_tokens=1", "validate_before=false"])
    summary = distill(cfg)
    out = tmp_path / "eval"
    results = run(eval_cfg(run_dir / "student", out, *data, f"paths.cache_dir={tmp_path / 'cache'}",
                           "pydoc_max_items=6", "scorer=lrc"))
    held, val = results["heldout"], summary["val"]
    assert results["teacher"] == "tiny-llama"
    for key in ("ce", "teacher_ce", "kl", "top1_agreement", "ppl", "teacher_ppl"):
        assert held[key] == pytest.approx(val[key], abs=2e-4, rel=1e-4), key
    assert held["tokens"] == 4 * 31 and math.exp(held["ce"]) == pytest.approx(held["ppl"])
    assert results["tokens_seen"] == summary["tokens_seen"]
    # pydoc_mc: the items written beside the results, scored as lrc's scorer scores them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = read_mc_file(out / "pydoc_mc.jsonl")
    assert len(items) == 6
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    expect = summarize(score_items(model, AutoTokenizer.from_pretrained(run_dir / "student"), items))
    assert results["tasks"]["pydoc_mc"]["acc"] == pytest.approx(expect["acc"])
    text = (out / "results.md").read_text()
    assert f"| CE (nats/token) | {held['ce']:.4f} | {held['teacher_ce']:.4f} |" in text
    assert json.loads((out / "results.json").read_text())["heldout"]["kl"] == pytest.approx(held["kl"])


# ------------------------------------------------------------------------------------- table
def test_table_renderer_against_a_hand_made_result():
    from lrc.eval.paper_results import paper_rows
    from lrc.eval.table import render_markdown

    values = {"arc_easy": 0.7, "arc_challenge": 0.4, "logiqa": 0.3, "commonsense_qa": 0.6, "piqa": 0.7,
              "winogrande": 0.6, "boolq": 0.75, "sciq": 0.9, "mmlu": 0.45}
    result = {"model": "runs/sft/x/model", "name": "model", "suite": "paper", "tokens_seen": 2_500_000_000,
              "tasks": {k: {"value": v} for k, v in values.items()}
              | {"pydoc_mc": {"metric": "acc", "value": 0.25, "n": 200, "num_fewshot": 0, "scorer": "lrc"}}}
    md = render_markdown(result).splitlines()
    header = "| Model | Tokens | Source | ARC-E | ARC-C | LogiQA | CSQA | PIQA | WinoG | BoolQ | SciQ | MMLU | Avg. |"
    i = md.index(header)
    assert md[i + 1] == "| " + " | ".join(["---"] * 13) + " |"
    assert "| LRC-1.5B | 10B | Table 1 (zero-shot, after SFT) | 74.75 | 44.97 | 30.72 | 65.77 | 73.07 | 62.25 | " \
           "75.78 | 94.60 | 49.42 | 63.48 |" in md
    assert "| LRC-4B | 18B | Table 2 (zero-shot, after SFT) | - | - | - | - | - | - | - | - | - | 70.30 |" in md
    assert "| LRC-1.5B-B | 10B | Table 15 (zero-shot, before SFT) | - | - | - | - | - | - | - | - | - | 62.48 |" in md
    avg = 100 * sum(values.values()) / 9  # 60.00
    assert md[i + 2 + len(paper_rows("paper"))] == (
        f"| **model** | 2.5B | lrc-eval | 70.00 | 40.00 | 30.00 | 60.00 | 70.00 | 60.00 | 75.00 | 90.00 | 45.00 | {avg:.2f} |")
    assert "| pydoc_mc | acc | 25.00 | 200 | 0 | lrc |" in md
    # a missing task: its cell and our Avg. are "-"
    del result["tasks"]["mmlu"]
    ours = [line for line in render_markdown(result).splitlines() if line.startswith("| **model**")][0]
    assert ours.endswith("| 90.00 | - | - |")  # SciQ, then MMLU and Avg. missing
    # safety: the paper's values are not given, so only our row, with the note
    safety = {"model": "m", "suite": "safety", "tasks": {"toxigen": {"value": 0.5}, "ifeval": {"value": 0.25}}}
    text = render_markdown(safety)
    assert "| Model | Tokens | Source | ToxiGen | IFEval | TruthfulQA-MC2 |" in text
    assert "| **this model** | - | lrc-eval | 50.00 | 25.00 | - |" in text
    assert "paper's values for the `safety` suite are not included" in text


def test_paper_rows_are_consistent():
    from lrc.eval.paper_results import PAPER_ROWS
    from lrc.eval.suites import SUITES

    columns = [s.column for s in SUITES["paper"]]
    for row in PAPER_ROWS["paper"]:
        assert row.source.startswith("Table ") and set(row.values) <= set(columns)
        if len(row.values) == len(columns):  # a full row: its Avg. is the mean of the nine
            assert sum(row.values.values()) / 9 == pytest.approx(row.avg, abs=0.005)
    assert [s.metric for s in SUITES["paper"]] == ["acc", "acc_norm", "acc_norm"] + ["acc"] * 6
    assert {s.num_fewshot for s in SUITES["fewshot"]} == {5}


# --------------------------------------------------------------------------------- bad input
def test_bad_inputs_are_refused_before_any_work(tiny_model_dir, mc_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="no model directory there"):
        run(eval_cfg(tmp_path / "missing", out))
    with pytest.raises(ConfigError, match="unknown suite 'papr'; known suites: offline, paper, safety, fewshot"):
        run(eval_cfg(tiny_model_dir, out, "suite=papr"))
    with pytest.raises(ConfigError, match=r"unknown key suit \(did you mean suite\?\)"):
        run(eval_cfg(tiny_model_dir, out, "+suit=paper"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "gold": 0}\n{"context": "b", "choices": ["x"], "gold": 0}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 2: field 'choices' must be a list of at least 2"):
        run(eval_cfg(tiny_model_dir, out, "suite=null", f"mc_files=[{bad}]"))
    from lrc.eval import harness

    monkeypatch.setattr(harness, "available", lambda: False)
    with pytest.raises(ConfigError, match=r"suite=paper needs lm-evaluation-harness.*pip install .*\[eval\]"):
        run(eval_cfg(tiny_model_dir, out, "suite=paper"))
    monkeypatch.undo()
    # a teacher whose tokenizer differs from the model's (one added token)
    from lrc.teachers import tiny_teacher, tiny_tokenizer

    other = tmp_path / "other_teacher"
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    tiny_teacher("llama", vocab_size=len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(ConfigError, match="tokenizers of model=.* differ"):
        run(eval_cfg(tiny_model_dir, out, f"teacher.source={other}", "pydoc_max_items=4"))
    assert not (out / "results.json").exists() and not (out / "pydoc_mc.jsonl").exists()


def test_unknown_lm_eval_task_is_named(tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(ConfigError, match=r"unknown lm-eval task 'arc_easyy' \(did you mean arc_easy"):
        run(eval_cfg(tiny_model_dir, tmp_path / "out", "suite=null", "tasks=[arc_easyy]"))
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_bad_input_in_one_line(tmp_path):
    proc = subprocess.run([str(Path(sys.executable).parent / "lrc-eval"), f"model={tmp_path / 'nope'}",
                           f"hydra.run.dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"lrc-eval: error: model={str(tmp_path / 'nope')!r}: " \
                                                   f"no model directory there (no config.json)"


@pytest.mark.parametrize("suite", ["paper", "fewshot", "safety"])
def test_hub_suites_read_the_papers_metric_per_task(tiny_model_dir, tmp_path, monkeypatch, suite):
    """The suites' plumbing with lm-eval replaced by a stub (no hub here): which tasks run at how
    many shots, which metric is read for each, the Avg. and the table row."""
    from lrc.eval import harness
    from lrc.eval.suites import SUITES

    calls = []

    def fake_run(model, tok, tasks, manager, num_fewshot=None, **kw):
        calls.append((list(tasks), num_fewshot))
        return {t: {"acc,none": 0.5, "acc_norm,none": 0.625, "inst_level_loose_acc,none": 0.75,
                    "acc_stderr,none": "N/A"} for t in tasks}

    monkeypatch.setattr(harness, "available", lambda: True)
    monkeypatch.setattr(harness, "task_manager", lambda *a, **k: None)
    monkeypatch.setattr(harness, "check_tasks", lambda names, manager: None)
    monkeypatch.setattr(harness, "run_tasks", fake_run)
    results = run(eval_cfg(tiny_model_dir, tmp_path / "out", f"suite={suite}"))
    specs = SUITES[suite]
    assert calls == [([s.task for s in specs], 5 if suite == "fewshot" else 0)]
    expected = {"acc": 0.5, "acc_norm": 0.625, "inst_level_loose_acc": 0.75}
    for s in specs:
        assert results["tasks"][s.task]["value"] == expected[s.metric], s.task
    assert {s.task: s.metric for s in specs if s.metric != "acc"} == {
        "paper": {"arc_challenge": "acc_norm", "logiqa": "acc_norm"}, "fewshot": {"arc_challenge": "acc_norm"},
        "safety": {"toxigen": "acc_norm", "ifeval": "inst_level_loose_acc"}}[suite]
    if suite == "paper":
        assert results["avg"] == pytest.approx((7 * 0.5 + 2 * 0.625) / 9)
        row = "| **" + tiny_model_dir.name + "** | - | lrc-eval | 50.00 | 62.50 | 62.50 | 50.00 | 50.00 | 50.00 | " \
              "50.00 | 50.00 | 50.00 | 52.78 |"
        assert row in (tmp_path / "out" / "results.md").read_text()
