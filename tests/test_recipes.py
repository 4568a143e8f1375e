"""The paper recipes and the run plan: global batch on any device count, planned tokens against the
data's unique tokens, RMSNorm eps, one source of defaults, optimizer groups, and what is logged
(tokens summed over processes, the gradient norm before clipping)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_cli import compose_cfg, tiny_overrides, write_corpus
from test_training import RandomTokens, make_module, trainer
from torch.utils.data import DataLoader

from lrc.cli.common import CONF_DIR, ConfigError
from lrc.cli.distill import apply_batch_plan, run
from lrc.losses import CLONE_TERMS, LossConfig
from lrc.model import CloneConfig
from lrc.training.module import LOG_DEFAULTS, OPTIM_DEFAULTS
from lrc.training.plan import (
    accumulation_steps, check_token_budget, declared_unique_tokens, device_count, tokens_per_step,
)

EXPERIMENTS = sorted(p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix()
                     for p in (CONF_DIR / "experiment").rglob("*.yaml"))  # paper/fig3_lrc too
# the paper's tokens per optimizer step (Table 10)
PAPER = {"paper_lrc_1_5b": 49_152, "paper_lrc_1_7b": 32_768, "paper_lrc_4b": 32_768}


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=["paths.output_dir=/nonexistent/run", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def composed(*overrides: str):
    """The resolved lrc-distill config for these overrides (composed once per test module)."""
    return copy.deepcopy(_composed(overrides))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")


# ---------------------------------------------------------------------- global batch (item 4)
@pytest.mark.parametrize(
    "gbs,micro,devices,nodes,expected",
    [(24, 3, 1, 1, 8), (24, 3, 2, 1, 4), (24, 3, 4, 1, 2), (24, 3, 8, 1, 1), (16, 2, 4, 2, 1), (16, 1, 2, 1, 8)],
)
def test_accumulation_steps_closed_form(gbs, micro, devices, nodes, expected):
    assert accumulation_steps(gbs, micro, devices, nodes) == expected
    assert expected * micro * devices * nodes == gbs


def test_accumulation_that_does_not_divide_names_the_keys_and_the_counts_that_do():
    with pytest.raises(ValueError) as err:
        accumulation_steps(24, 3, 5)
    msg = str(err.value)
    assert "global_batch_size=24" in msg and "data.batch_size=3" in msg and "5 device(s)" in msg
    assert "[1, 2, 4, 8]" in msg  # the device counts that divide 24 / 3 = 8
    with pytest.raises(ValueError, match="global_batch_size=16 .* 32 sequences per pass"):
        accumulation_steps(16, 2, 16)  # more sequences per pass than a step holds
    with pytest.raises(ValueError, match="data.batch_size must be a positive integer"):
        accumulation_steps(16, 0, 1)


@pytest.mark.parametrize("experiment", sorted(PAPER))
@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_paper_recipes_keep_their_tokens_per_step_on_any_device_count(experiment, devices):
    cfg = composed(f"experiment={experiment}")
    micro, seq = cfg["data"]["batch_size"], cfg["data"]["seq_len"]
    accum = accumulation_steps(cfg["global_batch_size"], micro, devices)
    assert accum == 8 // devices  # the paper's batch is 8 GPUs x one micro-batch
    assert tokens_per_step(seq, micro, devices, 1, accum) == PAPER[experiment]


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_recipe_on_a_device_count_that_does_not_divide_is_refused(experiment):
    cfg = composed(f"experiment={experiment}")
    with pytest.raises(ValueError, match=f"global_batch_size={cfg['global_batch_size']} sequences is not a multiple"):
        accumulation_steps(cfg["global_batch_size"], cfg["data"]["batch_size"], 3)


def test_device_count_resolves_lightning_settings():
    assert device_count("cpu", 3) == 3 and device_count("cpu", "2") == 2 and device_count("cpu", "auto") == 1
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="trainer.devices=-1 with trainer.accelerator='gpu'"):
            device_count("gpu", -1)


def test_cli_derives_accumulation_from_the_global_batch(corpus, tmp_path):
    """8 sequences per step from micro-batches of 2 on 1 device: 4 micro-batches per optimizer step."""
    out = tmp_path / "run"
    cfg = compose_cfg(tiny_overrides(corpus, out, "global_batch_size=8", "trainer.max_steps=2",
                                     "validate_before=false", "export.enabled=false", "logger=none"))
    summary = run(cfg)
    assert summary["steps"] == 2
    assert summary["tokens_seen"] == 2 * 8 * 32  # steps x global batch x seq_len
    assert OmegaConf.load(out / "config.yaml").trainer.accumulate_grad_batches == 4


@pytest.mark.parametrize(
    "extra,match",
    [
        (["global_batch_size=7"], r"global_batch_size=7 sequences is not a multiple of data.batch_size=2"),
        (["global_batch_size=8", "trainer.accumulate_grad_batches=2"],
         r"implies trainer.accumulate_grad_batches=4 .* set to 2"),
    ],
)
def test_cli_refuses_a_global_batch_that_does_not_fit_before_any_write(corpus, tmp_path, extra, match):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        run(compose_cfg(tiny_overrides(corpus, out, *extra)))
    assert not out.exists()


# ------------------------------------------------------------------- unique tokens (item 3)
def planned_tokens(cfg) -> int:
    t, d = cfg["trainer"], cfg["data"]
    per_step = (d["seq_len"] * cfg["global_batch_size"] if cfg.get("global_batch_size") is not None
                else tokens_per_step(d["seq_len"], d["batch_size"], max(int(t["devices"]), 1), 1,
                                     t["accumulate_grad_batches"]))
    return t["max_steps"] * per_step


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_plans_no_more_tokens_than_its_data_declares(experiment):
    cfg = composed(f"experiment={experiment}")
    sources = cfg["data"]["sources"]
    # every streamed hub source declares how many unique tokens it offers; local ones may not
    assert all(s.get("unique_tokens") for s in sources if s["kind"] == "hub"), sources
    unique = declared_unique_tokens(sources)
    if unique is None:
        assert all(s["kind"] in ("embedded", "jsonl", "parquet", "text") for s in sources)
        return
    assert planned_tokens(cfg) <= cfg["max_data_epochs"] * unique, (planned_tokens(cfg), unique)
    check_token_budget(planned_tokens(cfg), unique, cfg["max_data_epochs"])


def test_paper_1_7b_reads_20b_unique_fineweb_tokens_once():
    cfg = composed("experiment=paper_lrc_1_7b")
    by_name = {s["name"]: s for s in cfg["data"]["sources"]}
    assert by_name["fineweb_edu"]["unique_tokens"] == 20 * 10**9 and by_name["fineweb_edu"]["weight"] == 20.0
    assert cfg["data"]["max_train_tokens"] == declared_unique_tokens(cfg["data"]["sources"]) == 20_450_000_000
    assert cfg["max_data_epochs"] == 1
    assert 19.99e9 < planned_tokens(cfg) <= 20e9
    # the same 20B-token run over Mixed-1.1's 10B Fineweb tokens would read them twice: refused
    with pytest.raises(ValueError, match=r"declares 10,450,000,000 unique tokens .* 1.91 passes"):
        check_token_budget(planned_tokens(cfg), declared_unique_tokens(composed("data=mixed_1_1")["data"]["sources"]), 1)


def test_token_budget_closed_form():
    check_token_budget(100, 100, 1)
    check_token_budget(250, 100, 2.5)
    check_token_budget(10**12, None, 1)  # nothing declared: nothing to check
    with pytest.raises(ValueError, match="plans 101 tokens"):
        check_token_budget(101, 100, 1)
    with pytest.raises(ValueError, match="max_data_epochs must be > 0"):
        check_token_budget(1, 100, 0)
    assert declared_unique_tokens([{"unique_tokens": 3}, {"unique_tokens": 4}]) == 7
    assert declared_unique_tokens([{"unique_tokens": 3}, {"name": "x"}]) is None


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "10B"])
def test_unique_tokens_must_be_a_positive_integer(bad):
    from lrc.data.sources import SourceConfig, validate_source

    with pytest.raises(ValueError, match=r"data source 'x': unique_tokens must be a positive integer"):
        validate_source(SourceConfig(name="x", kind="hub", path="org/data", unique_tokens=bad))


def test_cli_refuses_a_run_longer_than_its_declared_data(corpus, tmp_path):
    src = f"data.sources=[{{name:toy,kind:jsonl,path:'{corpus}',unique_tokens:100}}]"
    out = tmp_path / "run"
    # 4 steps x 2 sequences x 32 tokens = 256 planned tokens > 100 declared
    with pytest.raises(ConfigError, match=r"plans 256 tokens .* declares 100 unique tokens"):
        run(compose_cfg(tiny_overrides(corpus, out, src)))
    assert not out.exists()
    cfg = compose_cfg(tiny_overrides(corpus, out, src, "max_data_epochs=3"))
    apply_batch_plan(cfg)  # 256 <= 3 x 100: accepted


# --------------------------------------------------------------------------- RMSNorm eps (item 5)
@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_experiments_use_rms_norm_eps_1e_5(experiment):
    cfg = composed(f"experiment={experiment}")
    assert cfg["student"]["rms_norm_eps"] == 1e-5
    assert CloneConfig(**cfg["student"]).rms_norm_eps == 1e-5


# ---------------------------------------------------------------- one source of defaults (item 9)
def test_conf_repeats_the_python_defaults():
    """conf/ group files that mirror a Python config hold exactly its defaults: optim/adam.yaml =
    OPTIM_DEFAULTS, loss/lrc.yaml = LossConfig(), student/default.yaml = CloneConfig (but the rank,
    which Python requires), distill.yaml's log = LOG_DEFAULTS."""
    optim = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optim" / "adam.yaml"))
    assert {**optim, "betas": tuple(optim["betas"])} == OPTIM_DEFAULTS

    loss_yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / "lrc.yaml"))
    py_loss = LossConfig()
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    assert set(loss_yaml) == fields
    for key in fields - {"term_weights"}:
        assert loss_yaml[key] == getattr(py_loss, key), key
    from_yaml = LossConfig(**loss_yaml)
    assert {t: from_yaml.weight(t) for t in CLONE_TERMS} == {t: py_loss.weight(t) for t in CLONE_TERMS}

    student = composed("~experiment")["student"]  # the group alone (not experiment/demo); seed follows the top-level seed
    py_student = {f.name: f.default for f in dataclasses.fields(CloneConfig) if f.default is not dataclasses.MISSING}
    assert set(student) - {"rank"} <= set(py_student)
    for key in set(student) - {"rank"}:
        assert student[key] == py_student[key], key

    assert OmegaConf.to_container(OmegaConf.load(CONF_DIR / "distill.yaml"))["log"] == LOG_DEFAULTS


def test_default_run_departs_from_the_paper_optimizer_only_where_it_says():
    """The optim group's default (optim/demo.yaml) is the paper's but for lr and warm-up; the default
    job (experiment/demo.yaml) lowers that lr again, for its pca init."""
    demo, paper = composed("~experiment")["optim"], composed("~experiment", "optim=adam")["optim"]
    changed = {k for k in paper if demo[k] != paper[k]}
    assert changed == {"lr", "warmup_ratio"} and demo["lr"] == 1e-3 and demo["warmup_ratio"] == 0.05
    job = composed()["optim"]
    assert {k for k in paper if job[k] != paper[k]} == {"lr", "warmup_ratio"} and job["lr"] == 3e-5
    for experiment in PAPER:
        assert composed(f"experiment={experiment}")["optim"]["betas"] == [0.9, 0.999]
        assert composed(f"experiment={experiment}")["optim"]["weight_decay"] == 0.0


def test_weight_decay_groups_by_name():
    module = make_module(optim={"name": "adamw", "weight_decay": 0.1})
    module.configure_model()
    groups = {g["name"]: g for g in module.param_groups(0.1)}
    names = {k: [n for n, _ in g["params"]] for k, g in groups.items()}
    assert names["projections"] == [n for n, _ in module.clone.named_projections()]
    assert names["gains"] == ["final_norm"] + [f"layers.{i}.{k}_norm" for i in (0, 1) for k in ("attn", "mlp")]
    assert groups["projections"]["weight_decay"] == 0.1 and groups["gains"]["weight_decay"] == 0.0
    every = [p for g in groups.values() for _, p in g["params"]]
    assert len(every) == len({id(p) for p in every}) == len(module.trainable_keys())


def test_adamw_decays_projections_but_never_gains(tmp_path):
    """One AdamW step with and without weight decay from the same start: the gains come out
    identical, each projection differs by exactly lr * wd * its starting value."""
    lr, wd = 1e-2, 0.1
    runs = {}
    for decay in (0.0, wd):
        module = make_module(optim={"name": "adamw", "weight_decay": decay, "lr": lr, "schedule": "constant",
                                    "warmup_ratio": 0.0})
        module.configure_model()
        start = {n: p.detach().clone() for n, p in module.clone.named_trainable()}
        trainer(tmp_path / str(decay), steps=1).fit(module, datamodule=RandomTokens())
        runs[decay] = {n: p.detach() for n, p in module.clone.named_trainable()}
    gains = {n for n, _ in module.clone.named_student_norms()}
    for name, p0 in start.items():
        if name in gains:
            assert torch.equal(runs[0.0][name], runs[wd][name]), name
        else:
            torch.testing.assert_close(runs[0.0][name] - runs[wd][name], lr * wd * p0, rtol=1e-3, atol=2e-8)  # fp32 ulp at |p| ~ 0.02


# --------------------------------------------------------------------------------- logging (item 8)
class ClippedNorm(L.Callback):
    """The gradient norm right after the optimizer step, i.e. after Lightning's clipping."""

    def on_train_batch_end(self, trainer, module, *args):
        self.norm = torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for p in module.parameters() if p.grad is not None])).item()


def test_logged_grad_norm_is_the_norm_before_clipping(tmp_path):
    data = RandomTokens()
    reference = make_module()
    reference.configure_model()
    batch = next(iter(data.train_dataloader()))
    terms = reference.loss_fn(reference.clone(batch["input_ids"], terms=reference.loss_fn.request), batch["input_ids"])
    terms["loss"].backward()
    expected = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in reference.parameters() if p.grad is not None))
    module, clipped = make_module(), ClippedNorm()
    t = trainer(tmp_path, steps=1, gradient_clip_val=1e-3, callbacks=[clipped])
    t.fit(module, datamodule=data)
    assert expected > 1e-2  # far above the clip value, so clipping changes it
    assert t.callback_metrics["train/grad_norm_preclip"].item() == pytest.approx(expected, rel=1e-5)
    assert clipped.norm == pytest.approx(1e-3, rel=1e-3)  # what the step used: clipped
    assert "train/grad_norm" not in t.callback_metrics


class TwoSources(RandomTokens):
    source_names = ["a", "b"]

    def _loader(self):
        items = [{"input_ids": x, "source_ids": torch.tensor(i % 2)} for i, x in enumerate(self.data)]
        return DataLoader(items, batch_size=self.batch_size)


def test_token_counts_are_summed_over_processes(tmp_path):
    """Two real CPU processes (DDP, gloo): each sees half the batches; the counters and the logged
    values hold the total of both."""
    data = TwoSources(n=16, length=12, batch_size=4)
    t = trainer(tmp_path, steps=2, strategy="ddp_fork", devices=2)
    t.fit(make_module(), datamodule=data)
    per_rank_step = 4 * 12
    assert t.callback_metrics["train/tokens_seen"].item() == 2 * 2 * per_rank_step
    # sources alternate within each batch: half of every batch is "a", half "b"
    assert t.callback_metrics["train/tokens/a"].item() == t.callback_metrics["train/tokens/b"].item() == 2 * per_rank_step


def test_token_counts_on_one_process(tmp_path):
    module = make_module()
    t = trainer(tmp_path, steps=3)
    t.fit(module, datamodule=TwoSources(n=16, length=12, batch_size=4))
    assert module.tokens_seen == 3 * 4 * 12 == t.callback_metrics["train/tokens_seen"].item()
    assert module.tokens_per_source == {"a": 3 * 2 * 12, "b": 3 * 2 * 12}


# ------------------------------------------------------------------------ stand-alone docs (item 20)
REPO = CONF_DIR.parent


def test_project_stands_alone_and_method_doc_names_real_keys():
    """Nothing points outside the repository for the method; docs/method.md names only config keys,
    experiments and data options that exist."""
    outside = ["shared" + "/docs", "lrc" + "-method", "spec" + " section", "../" + "shared"]
    files = [REPO / "README.md", REPO / "Makefile", REPO / "pyproject.toml"]
    for folder in ("lrc", "conf", "docs", "tests", "notebooks", "experiments"):
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".ipynb")]
    hits = [f"{p.relative_to(REPO)}: {s}" for p in files for s in outside if s in p.read_text(errors="ignore")]
    assert not hits, hits
    doc = (REPO / "docs" / "method.md").read_text()
    assert "docs/method.md" in (REPO / "README.md").read_text()
    fields = {"loss": {f.name for f in dataclasses.fields(LossConfig)},
              "student": {f.name for f in dataclasses.fields(CloneConfig)}, "optim": set(OPTIM_DEFAULTS)}
    named = re.findall(r"`(loss|student|optim)\.(\w+)", doc)
    assert len(named) >= 10
    for section, key in named:
        assert key in fields[section], f"docs/method.md names {section}.{key}"
    for group, option in re.findall(r"`(experiment|data|optim)=([\w/]+)`", doc):  # paper/fig3_lrc too
        assert (CONF_DIR / group / f"{option}.yaml").is_file(), f"{group}={option}"
    for experiment in PAPER:
        assert f"experiment={experiment}" in doc
