"""lrc-pipeline: the chain distill -> sft -> eval on a tiny teacher, stage skipping and resuming, and
bad configs refused before any work; the completion checks of lrc.pipeline on hand-made files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lrc.cli.common import CONF_DIR, ConfigError
from lrc.pipeline import check_stages, is_complete, reserved_override, stage_input, stage_overrides
from test_cli import tiny_overrides, write_corpus


# ----------------------------------------------------------------------- pure functions
def test_stage_selection_and_inputs(tmp_path):
    assert check_stages(["eval", "distill"]) == ["distill", "eval"]  # always in chain order
    for bad in ([], ["train"], ["sft", "sft"]):
        with pytest.raises(ValueError, match="stages"):
            check_stages(bad)
    r = tmp_path
    assert stage_input(r, "distill", ["distill", "sft", "eval"]) is None
    assert stage_input(r, "sft", ["distill", "sft"]) == r / "distill" / "student"
    assert stage_input(r, "eval", ["distill", "sft", "eval"]) == r / "sft" / "model"
    assert stage_input(r, "eval", ["distill", "eval"]) == r / "distill" / "student"  # sft not selected
    assert stage_input(r, "eval", ["eval"]) == r / "sft" / "model"  # a later run in the same root
    assert stage_input(r, "sft", ["sft"]) == r / "distill" / "student"


def test_stage_overrides_and_reserved_keys(tmp_path):
    over = stage_overrides("sft", ["trainer.max_steps=3"], tmp_path, ["distill", "sft"], cache_dir="/c")
    assert over == ["paths.cache_dir='/c'", "trainer.max_steps=3", f"paths.output_dir='{tmp_path / 'sft'}'",
                    "ckpt_path=auto", f"model.source='{tmp_path / 'distill' / 'student'}'"]
    ev = stage_overrides("eval", [], tmp_path, ["eval"])
    assert ev == [f"paths.output_dir='{tmp_path / 'eval'}'", f"model='{tmp_path / 'sft' / 'model'}'"]  # no resume key
    for stage, o in [("distill", "paths.output_dir=/x"), ("sft", "+model.source=/m"), ("eval", "model=/m"),
                     ("distill", "hydra.run.dir=/x"), ("sft", "ckpt_path=last")]:
        assert reserved_override(o, stage) is not None
        with pytest.raises(ValueError, match="the pipeline sets"):
            stage_overrides(stage, [o], tmp_path, [stage])
    assert reserved_override("model.dtype=float32", "sft") is None and reserved_override("model=x", "sft") is None


def test_completion_markers(tmp_path):
    d = tmp_path / "distill"
    assert not is_complete("distill", d)
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"status": "finished"}))
    assert not is_complete("distill", d)  # no exported student
    (d / "student").mkdir()
    (d / "student" / "config.json").write_text("{}")
    assert is_complete("distill", d)
    (d / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    assert not is_complete("distill", d)
    (d / "metrics.json").write_text("{trunc")
    assert not is_complete("distill", d)
    s = tmp_path / "sft"
    (s / "model").mkdir(parents=True)
    (s / "model" / "config.json").write_text("{}")
    (s / "metrics.json").write_text(json.dumps({"status": "finished"}))
    assert is_complete("sft", s) and not is_complete("sft", d)  # sft's output is model/, not student/
    e = tmp_path / "eval"
    e.mkdir()
    assert not is_complete("eval", e, s / "model")
    (e / "results.json").write_text(json.dumps({"model": str(s / "model")}))
    assert is_complete("eval", e, s / "model")
    assert not is_complete("eval", e, d / "student")  # results of another model: not this stage's


# ------------------------------------------------------------------------- the real chain
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline_data")
    corpus = write_corpus(folder / "corpus.jsonl")
    chats = folder / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(60)]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return corpus, chats


def pipeline_cfg(root: Path, corpus: Path, chats: Path, *extra: str):
    distill = [o for o in tiny_overrides(corpus, root / "unused") if not o.startswith("paths.")]
    distill += ["trainer.max_steps=2", "validate_before=false", "summary.max_new_tokens=1"]
    sft = ["data=chat_local_jsonl", f"data.sources=[{{name:toy,kind:jsonl,path:'{chats}'}}]", "data.seq_len=96",
           "data.batch_size=2", "data.val_fraction=0.1", "trainer.max_steps=2", "trainer.limit_val_batches=1",
           "logger=csv", "summary.max_new_tokens=1", "validate_before=false"]
    evals = ["data=local_jsonl", f"data.sources=[{{name:toy,kind:jsonl,path:'{corpus}'}}]", "data.seq_len=32",
             "data.batch_size=2", "data.val_fraction=0.2", "data.val_sequences=4", "pydoc_max_items=4", "scorer=lrc"]
    overrides = [f"paths.output_dir={root}", f"paths.cache_dir={root.parent / 'cache'}",
                 f"distill={json.dumps(distill)}", f"sft={json.dumps(sft)}", f"eval={json.dumps(evals)}", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("pipeline", overrides=overrides)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (but the pipeline's lock) with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lrc-distill.lock"}


def test_chain_resumes_after_a_failed_stage_and_skips_complete_ones(data, tmp_path, monkeypatch):
    from lrc.cli import pipeline, sft
    from lrc.cli.pipeline import run

    corpus, chats = data
    root = tmp_path / "root"
    cfg = pipeline_cfg(root, corpus, chats)

    # 1. sft crashes: distill is complete, sft and eval never complete
    def crash(cfg):
        raise RuntimeError("simulated crash in stage sft")

    monkeypatch.setattr(sft, "run", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    assert is_complete("distill", root / "distill")
    assert not (root / "sft" / "metrics.json").exists() and not (root / "eval").exists()
    distill_files = snapshot(root / "distill")
    monkeypatch.undo()

    # 2. the same command again: distill skipped (its files untouched), sft and eval run
    ran: list[str] = []
    real = pipeline.resolve

    def spy(path):
        fn = real(path)
        if path.endswith(":run"):
            def wrapped(c, fn=fn, path=path):
                ran.append(path.split(".")[2].split(":")[0])
                return fn(c)
            return wrapped
        return fn

    monkeypatch.setattr(pipeline, "resolve", spy)
    report = run(cfg)
    assert ran == ["sft", "eval"]
    assert {s: r["status"] for s, r in report.items()} == {"distill": "skipped", "sft": "ran", "eval": "ran"}
    assert snapshot(root / "distill") == distill_files
    sft_summary = json.loads((root / "sft" / "metrics.json").read_text())
    assert sft_summary["status"] == "finished" and sft_summary["steps"] == 2
    assert sft_summary["model"] == str(root / "distill" / "student")  # sft read distill's student
    results = json.loads((root / "eval" / "results.json").read_text())
    assert Path(results["model"]) == root / "sft" / "model"  # eval read sft's model
    assert results["teacher"] == "tiny-llama"  # found through the sft run to the distill run
    assert report["eval"]["result"] == results and results["heldout"]["ce"] > 0
    # each stage recorded its own overrides, not the pipeline's
    distill_summary = json.loads((root / "distill" / "metrics.json").read_text())
    assert "teacher=tiny_llama" in distill_summary["overrides"] and "ckpt_path=auto" in distill_summary["overrides"]
    assert "ckpt_path=auto" in sft_summary["overrides"] and "data=chat_local_jsonl" in sft_summary["overrides"]

    # 3. once more: every stage is complete, nothing runs and no file changes
    ran.clear()
    before = snapshot(root)
    report = run(cfg)
    assert ran == [] and {r["status"] for r in report.values()} == {"skipped"}
    assert snapshot(root) == before

    # 4. eval alone, of the sft model, in the same root: complete, skipped
    assert run(pipeline_cfg(root, corpus, chats, "stages=[eval]"))["eval"]["status"] == "skipped"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["stages=[train]"], r"stages must be a non-empty list"),
        (["sft=5"], r"sft must be a list of sft overrides"),
        (["+colour=blue"], r"unknown key colour"),
        (['distill=["student.rank=577"]'], r"stage distill: .*rank must be an integer in \[1, 576\]"),
        (['sft=["optim.lr=-1"]'], r"stage sft: .*lr"),
        (['sft=["trainer.max_stepz=3"]'], r"stage sft: .*max_stepz"),
        (['eval=["suite=nope"]'], r"stage eval: suite"),
        (['eval=["data=nope"]'], r"stage eval: .*nope"),
        (['distill=["export.enabled=false"]'], r"stage distill: export.enabled=false, but stage sft reads its student/"),
        (['sft=["model.source=/m"]'], r"the pipeline sets model.source itself"),
        (["stages=[sft,eval]"], r"stage sft reads .*distill/student, which holds no model"),
    ],
)
def test_bad_config_is_refused_before_any_work(data, tmp_path, extra, message):
    from lrc.cli.pipeline import run

    corpus, chats = data
    root = tmp_path / "root"
    cfg = pipeline_cfg(root, corpus, chats, *extra)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not root.exists()  # nothing was written


def test_a_locked_output_root_is_refused_naming_lrc_pipeline(data, tmp_path):
    from lrc.cli.pipeline import run
    from test_sft import refused_while_locked

    corpus, chats = data
    root = tmp_path / "root"
    message = refused_while_locked(root, lambda: run(pipeline_cfg(root, corpus, chats)))  # no stage starts
    assert message == (f"output directory {root} is in use by another lrc-pipeline run (pid 4242 on node7); "
                       f"wait for it to end or choose another directory (hydra.run.dir=...)")


def test_command_line(data, tmp_path, capsys):
    """The real entry point: a bad stage override is one line and status 2, nothing written."""
    import sys

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from lrc.cli.pipeline import main

    root = tmp_path / "root"
    argv = sys.argv
    sys.argv = ["lrc-pipeline", f"hydra.run.dir={root}", 'distill=["teacher=tiny_llama","student.rank=0"]']
    try:
        with pytest.raises(SystemExit) as err:
            main()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    assert err.value.code == 2
    out = capsys.readouterr().err
    assert out.startswith("lrc-pipeline: error: stage distill:") and "rank must be an integer" in out
    assert not any(root.rglob("*")) if root.exists() else True
