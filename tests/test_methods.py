"""The method is a config choice (issue 7): lrc, kd, tinybert, and a method defined in this file,
through the same lrc-distill, training loop, checkpoints and lrc-export."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from clone_utils import ARCHS, random_ids
from omegaconf import OmegaConf
from test_cli import cli, cli_args, compose_cfg, tiny_overrides, write_corpus
from transformers import AutoModelForCausalLM

from lrc.cli.checks import check_config
from lrc.cli.common import CONF_DIR, ConfigError
from lrc.losses import next_token_cross_entropy
from lrc.methods.kd import KDLossConfig, KDModel, KDModule, plain_student_settings
from lrc.methods.lrc import LRCModule
from lrc.methods.tinybert import TinyBERTLossConfig, TinyBERTModule
from lrc.model import CloneConfig
from lrc.teachers import tiny_teacher
from lrc.training.module import DistillModule, method_class

CLASSES = {"lrc": LRCModule, "kd": KDModule, "tinybert": TinyBERTModule}
#: the same non-default student for every method: every other layer, own eps, untied head
STUDENT = ("student.layer_stride=2", "student.rms_norm_eps=1e-5", "student.tie_head_projection=false")
#: two steps are enough here: a shorter run than test_cli's
SHORT = ("trainer.max_steps=2", "validate_before=false")
#: per method: overrides of its own settings, and the logged loss as a function of the logged terms
SETTINGS = {
    "lrc": ((), lambda r: r["train/ce"] + r["train/kl"] + 0.2 * r["train/clone"]),
    "kd": (("loss.w_kl=2",), lambda r: r["train/ce"] + 2 * r["train/kl"]),
    "tinybert": (("loss.w_attn=3", "method.shared_map=true"),
                 lambda r: r["train/ce"] + r["train/kl"] + r["train/hidden"] + 3 * r["train/attn"]),
}
#: logged columns each method must have (per-layer columns use teacher layer indices: kept 0 and 2)
COLUMNS = {
    "lrc": ("train/clone", "train/clone/gate", "train_layers/clone/q/2"),
    "kd": ("train/kl",),
    "tinybert": ("train/hidden", "train/attn", "train_layers/tinybert/attn/2", "train_layers/tinybert/hidden/embed"),
}
_NOT_SHAPE = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")


def shape(config) -> dict:
    """A transformers config without what says how it was saved rather than what it is."""
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_SHAPE}


def rows(out: Path) -> list[dict[str, float]]:
    """The csv logger's rows, numbers only."""
    with (out / "csv" / "metrics.csv").open() as fh:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(fh)]


def rebuilt(ckpt: Path) -> DistillModule:
    """The module of the checkpoint's last step, from the class it records (as lrc-export does)."""
    state = torch.load(ckpt, weights_only=True)
    module = method_class(state["lrc"]["method_target"])(**state["hyper_parameters"])
    module.configure_model()
    module.load_state_dict({**module.state_dict(), **state["state_dict"]})
    return module.eval()


def assert_export_matches_training_forward(module: DistillModule, path: Path) -> AutoModelForCausalLM:
    exported = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = random_ids(exported.config.vocab_size, length=14, seed=3)
    with torch.no_grad():
        trained = module._forward({"input_ids": ids}, training=False).student_logits
        got = exported(ids).logits
    assert (got - trained).abs().max() <= 1e-5
    return exported


# --------------------------------------------------------------------------- the shipped methods
@pytest.mark.parametrize("method", CLASSES)
def test_every_method_trains_and_exports_its_student_through_the_cli(corpus, tmp_path, capsys, method):
    extra, loss_of = SETTINGS[method]
    out = tmp_path / "run"
    code, text = cli(capsys, "distill", *cli_args(corpus, out, f"method={method}", *STUDENT, *SHORT, *extra))
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["status"] == "finished" and metrics["steps"] == 2
    # every step logs the method's terms, and its loss is their weighted sum with the configured weights
    logged = [r for r in rows(out) if "train/loss" in r]
    assert len(logged) == 2
    for r in logged:
        assert r["train/loss"] == pytest.approx(loss_of(r), rel=1e-5)
    header = set().union(*map(set, rows(out)))
    assert set(COLUMNS[method]) <= header and ("train/clone" in header) == (method == "lrc")

    ckpt = out / "checkpoints" / "last.ckpt"
    code, text = cli(capsys, "export", f"ckpt={ckpt}", f"out={tmp_path / 'exported'}")
    assert code == 0, text
    module = rebuilt(ckpt)
    assert type(module) is CLASSES[method]
    exported = assert_export_matches_training_forward(module, tmp_path / "exported")
    at_end = AutoModelForCausalLM.from_pretrained(out / "student")  # the run's own export
    ids = random_ids(exported.config.vocab_size, seed=4)
    assert torch.equal(at_end(ids).logits, exported(ids).logits)
    # exactly the student the LRC export has for these student settings
    lrc = LRCModule(teacher=module.teacher_cfg, student=module.student_cfg)
    lrc.configure_model()
    assert shape(exported.config) == shape(lrc.deployed_config())
    assert exported.config.num_hidden_layers == 2 and exported.config.rms_norm_eps == 1e-5
    state = torch.load(ckpt, weights_only=True)
    assert metrics["params"]["deployed"] == sum(p.numel() for p in exported.parameters())
    assert metrics["params"]["trainable"] == sum(v.numel() for v in state["state_dict"].values())
    if method == "tinybert":  # one shared D x d map trains beside the student, and is not exported
        assert metrics["params"]["trainable"] == metrics["params"]["deployed"] + 64 * 16
    # a resume continues the same method
    other = "kd" if method == "lrc" else "lrc"
    code, text = cli(capsys, "distill", *cli_args(corpus, out, f"method={other}", *STUDENT, "ckpt_path=last"))
    assert code == 2 and "method._target_=" in text and "written with other settings" in text


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "student,tied",
    [
        ({"rank": 24}, True),
        ({"rank": 16, "layers": [1, 3], "rms_norm_eps": 1e-5}, False),
        ({"rank": 8, "layer_stride": 2, "tie_head_projection": False}, True),
        ({"rank": 40, "tie_head_projection": True}, False),
    ],
)
def test_baseline_students_have_the_lrc_export_shape(arch, student, tied):
    teacher = tiny_teacher(arch, tie_word_embeddings=tied)
    lrc = LRCModule(teacher={"source": f"tiny-{arch}"}, student=student, teacher_model=teacher)
    lrc.configure_model()
    expected = shape(lrc.deployed_config())
    for cls in (KDModule, TinyBERTModule):
        module = cls(teacher={"source": f"tiny-{arch}"}, student=student, teacher_model=teacher)
        module.configure_model()
        assert shape(module.model.student.config) == expected, cls.__name__
        plain = module.model.student
        assert module.deployed_parameter_count() == lrc.deployed_parameter_count() == sum(
            p.numel() for p in plain.parameters())
        assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == expected["tie_word_embeddings"]


def test_plain_student_settings_read_the_shared_student_keys():
    teacher = tiny_teacher("qwen2", num_layers=4, tie_word_embeddings=False).to(torch.bfloat16)
    student = {"rank": 16, "layer_stride": 3, "seed": 4, "init_std": 0.3, "rms_norm_eps": 1e-4,
               "param_dtype": "teacher", "tie_head_projection": None}
    assert plain_student_settings(student, teacher) == {
        "rank": 16, "kept_layers": [0, 3], "seed": 4, "init_std": 0.3, "rms_norm_eps": 1e-4,
        "tie_word_embeddings": False, "dtype": torch.bfloat16,  # an untied teacher: an untied student
    }
    module = KDModule(teacher={}, student={**student, "param_dtype": "float32"}, teacher_model=teacher)
    module.configure_model()
    up = module.model.student.model.layers[1].mlp.up_proj.weight
    assert up.dtype == torch.float32 and up.std().item() == pytest.approx(0.3, rel=0.05)


@pytest.mark.parametrize(
    "method,override,key",
    [("kd", "student.attn_sharing=io", "attn_sharing"), ("kd", "student.ffn_sharing=io", "ffn_sharing"),
     ("tinybert", "student.init=orthogonal", "init"), ("kd", "student.init_calibration_sequences=4",
                                                       "init_calibration_sequences")],
)
def test_clone_only_student_keys_are_refused_by_the_baselines(corpus, tmp_path, capsys, method, override, key):
    out = tmp_path / "run"
    code, text = cli(capsys, "distill", *cli_args(corpus, out, f"method={method}", override))
    assert code == 2
    assert f"lrc-distill: error: student.{key}=" in text and f"method={method} does not use" in text
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("method", ["kd", "tinybert"])
def test_a_baseline_on_the_embedded_default_job_is_refused_with_the_way_out(corpus, tmp_path, capsys, method):
    # experiment=demo (what lrc-distill runs with no experiment) sets loss.alpha and student.init=pca
    out = tmp_path / "run"
    code, text = cli(capsys, "distill", *cli_args(corpus, out, "experiment=demo", f"method={method}"))
    assert code == 2
    assert "unknown key loss.alpha" in text
    assert f"experiment=demo, is an LRC recipe: run method={method} with experiment=paper/fig3_{method} or" in text
    assert "'~experiment'" in text and not (out / "config.yaml").exists()
    # the same refusal without the demo carries no such hint
    code, text = cli(capsys, "distill", *cli_args(corpus, out, f"method={method}", "+loss.alpha=0"))
    assert code == 2 and "unknown key loss.alpha" in text and "experiment=demo" not in text


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method=kd", "+loss.alpha=0.5"],
         "unknown key loss.alpha; method kd reads kl_reduction, kl_tau_squared, temperature, w_ce, w_kl"),
        (["method=kd", "experiment=ablation_no_clone"], "unknown key loss.alpha"),  # an LRC ablation
        (["method=tinybert", "+loss.term_weights.q=0"], "unknown key loss.term_weights"),
        (["+loss.w_hidden=1"], "unknown key loss.w_hidden"),  # lrc has no TinyBERT terms
        (["method=kd", "loss.w_kl=abc"], "loss.w_kl must be a number, got 'abc'"),
        (["method=tinybert", "method.shared_map=3"], "method.shared_map must be true or false, got 3"),
        (["method=kd", "+method.shared_map=true"], "unknown key method.shared_map"),
        (["method._target_=collections.OrderedDict"], "is not a distillation method"),
        (["method._target_=lrc.methods.nope.Method"], "cannot be imported"),
        (["method=tinybert", "loss.w_hidden=0.5", "method.shared_map=true", "loss.temperature=2"], None),
        (["method=kd", "loss.w_kl=2", "student.init_std=0.1", "student.param_dtype=teacher"], None),
    ],
)
def test_loss_and_method_keys_are_those_of_the_active_method(corpus, tmp_path, overrides, message):
    cfg = compose_cfg(tiny_overrides(corpus, tmp_path / "run", *overrides))
    if message is None:
        check_config(cfg, CONF_DIR)
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(cfg, CONF_DIR)


def test_method_configs_repeat_the_python_defaults():
    """Each conf/method option names its class, its name and its loss option, whose values are the
    method's ``loss_config`` defaults."""
    expected = {"lrc": None, "kd": KDLossConfig(), "tinybert": TinyBERTLossConfig()}
    assert sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml")) == sorted(CLASSES)
    for name, cls in CLASSES.items():
        cfg = OmegaConf.to_container(compose_cfg(["~experiment", f"method={name}", "paths.output_dir=x"]), resolve=True)
        options = dict(cfg["method"])
        assert method_class(options.pop("_target_")) is cls and options.pop("name") == cls.default_name == name
        defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
        assert options == {k: defaults[k] for k in options}  # method knobs: the constructor's defaults
        own_loss = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "loss" / f"{name}.yaml"))
        assert cfg["loss"] == own_loss  # the method's loss option, whatever loss the default list names
        if expected[name] is not None:  # (loss/lrc.yaml against LossConfig: tests/test_recipes.py)
            assert own_loss == dataclasses.asdict(expected[name])
    assert compose_cfg(["paths.output_dir=x"]).method._target_ == "lrc.methods.lrc.LRCModule"  # the default


def test_method_class_refuses_what_is_not_a_method():
    assert method_class(None) is LRCModule  # checkpoints written before the method was recorded
    for target in ("lrc.training.module.DistillModule", "lrc.methods.kd.kd_loss", "collections.OrderedDict"):
        with pytest.raises(ValueError, match="is not a distillation method"):
            method_class(target)
    with pytest.raises(ValueError, match="cannot be imported"):
        method_class("lrc.methods.kd.NoSuchModule")


# --------------------------------------------------------------------- a method added in this file
@dataclasses.dataclass
class CELossConfig:
    """The new method's ``loss`` settings."""

    w_ce: float = 1.0


class CEOnlyModule(DistillModule):
    """A whole method: KD's plain student, trained on next-token CE alone (no teacher signal)."""

    default_name = "ce_only"
    loss_config = CELossConfig

    @classmethod
    def check_settings(cls, teacher_config, student, loss):
        CloneConfig(**student).validate_for(teacher_config)
        cls.loss_config(**loss)

    def build_model(self, teacher, tokenizer, restoring):
        return KDModel.from_teacher(teacher, tokenizer=tokenizer, **plain_student_settings(self.student_cfg, teacher))

    def loss_terms(self, out, batch):
        ce = next_token_cross_entropy(out.student_logits, batch["input_ids"])
        return {"loss": self.loss_settings.w_ce * ce, "ce": ce}

    def deployed_config(self):
        return self.model.student.config


CE_ONLY_CONFIG = """\
# @package _global_
defaults:
  - override /loss: null       # the loss settings are below
method:
  _target_: test_methods.CEOnlyModule
  name: ce_only                # recorded in metrics.json
loss:
  w_ce: 1.0                    # CE weight
"""


def test_a_new_method_is_one_class_and_one_config(corpus, tmp_path, capsys):
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "ce_only.yaml").write_text(CE_ONLY_CONFIG)
    out = tmp_path / "run"
    new = (f"hydra.searchpath=[file://{conf}]", "method=ce_only", "loss.w_ce=0.5", *SHORT)
    code, text = cli(capsys, "distill", *cli_args(corpus, out, *new, "+loss.w_kl=1"))
    assert code == 2 and "unknown key loss.w_kl; method ce_only reads w_ce" in text
    code, text = cli(capsys, "distill", *cli_args(corpus, out, *new))
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ce_only" and metrics["steps"] == 2
    logged = [r for r in rows(out) if "train/loss" in r]
    assert len(logged) == 2 and all(r["train/loss"] == pytest.approx(0.5 * r["train/ce"], rel=1e-6) for r in logged)
    assert "train/kl" not in set().union(*map(set, logged))
    assert set(metrics["val"]) >= {"ce", "kl", "top1_agreement"}  # validation is the loop's, whatever the method
    code, text = cli(capsys, "export", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'exported'}")
    assert code == 0, text
    module = rebuilt(out / "checkpoints" / "last.ckpt")
    assert type(module) is CEOnlyModule
    exported = assert_export_matches_training_forward(module, tmp_path / "exported")
    assert metrics["params"]["deployed"] == sum(p.numel() for p in exported.parameters())


def test_export_refuses_a_checkpoint_naming_something_else(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, text = cli(capsys, "distill", *cli_args(corpus, out, "method=kd", "trainer.max_steps=1",
                                                  "validate_before=false", "export.enabled=false"))
    assert code == 0, text
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    state["lrc"]["method_target"] = "os.path.join"
    torch.save(state, tmp_path / "foreign.ckpt")
    code, text = cli(capsys, "export", f"ckpt={tmp_path / 'foreign.ckpt'}", f"out={tmp_path / 'x'}")
    assert code == 2 and "was not written by a method lrc can rebuild" in text and "'os.path.join'" in text
    assert not (tmp_path / "x").exists()


def test_readme_module_example_runs(tmp_path, monkeypatch):
    """The README's LightningModule example, executed as written on a tiny in-memory data module."""
    from test_training import RandomTokens

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```python\n", readme.index("**Methods as LightningModules**")) + len("```python\n")
    code = readme[start:readme.index("```", start)]
    code = "\n".join(line[2:] for line in code.splitlines())  # the block is indented in a list item
    monkeypatch.chdir(tmp_path)
    scope = {"my_datamodule": RandomTokens()}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["module"].global_step == 2
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "my-student")
    assert student.config.hidden_size == 16
