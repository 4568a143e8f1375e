"""The reference code's clone terms for IO-shared projections (``loss.shared_projection_terms:
reference``, Table 7): ``attn_in`` for one shared Pqkv, ``ffn_in`` and ``down`` in the teacher's
width for one shared Pgate_up, each against a hand computation from the teacher's and the
exported student's own transformers forward; which terms each sharing gets; training; the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from clone_utils import ARCHS, make_clone, random_ids, randomize_trainable
from test_cli import cli, cli_args, write_corpus
from test_model import random_orthogonal

from lrc.losses import CLONE_TERMS, LossConfig, LRCLoss, TermRequest
from lrc.model import CloneConfig, LowRankClone
from lrc.teachers import tiny_teacher

REFERENCE = LossConfig(shared_projection_terms="reference")
#: (attn_sharing, ffn_sharing) -> the terms "reference" computes, in registry order
REFERENCE_TERMS = {
    ("all", "all"): CLONE_TERMS,
    ("io", "all"): ("o", "gate", "up", "down", "attn_in"),
    ("all", "io"): ("q", "k", "v", "o", "down", "ffn_in"),
    ("io", "io"): ("o", "down", "attn_in", "ffn_in"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.jsonl")


def hooked_activations(model, ids) -> dict[tuple[str, int], torch.Tensor]:
    """Per layer, from transformers' own forward: the normalised attention input ("attn_in"), the
    normalised FFN input ("ffn_in"), the input of down_proj ("hidden") and the FFN output ("down")."""
    acts, handles = {}, []

    def keep(key, take):
        return lambda mod, args, out: acts.__setitem__(key, take(args, out).detach())

    for i, layer in enumerate(model.model.layers):
        handles += [
            layer.input_layernorm.register_forward_hook(keep(("attn_in", i), lambda a, o: o)),
            layer.post_attention_layernorm.register_forward_hook(keep(("ffn_in", i), lambda a, o: o)),
            layer.mlp.down_proj.register_forward_hook(keep(("hidden", i), lambda a, o: a[0])),
            layer.mlp.down_proj.register_forward_hook(keep(("down", i), lambda a, o: o)),
        ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return acts


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()) ** 2).mean().item()


# --------------------------------------------------------------------------- values by hand
@pytest.mark.parametrize("arch", ARCHS)
def test_reference_terms_equal_a_hand_computation(arch):
    """IO attention and IO FFN with the reference terms: per layer, attn_in = MSE(x_s @ Pqkv.T, x_t)
    and ffn_in = MSE(y_s @ Pgate_up.T, y_t) of the normalised inputs, and down = MSE(h_s @
    Wdown_t.T, teacher FFN output) of the student's down_proj input h_s, all from hooks on the
    teacher and on the exported student (transformers' code, not the clone's)."""
    clone = make_clone(arch, rank=16, attn_sharing="io", ffn_sharing="io")
    randomize_trainable(clone, std=0.2)
    loss_fn = LRCLoss(REFERENCE)
    assert loss_fn.check_sharing("io", "io") == REFERENCE_TERMS[("io", "io")]
    ids = random_ids(clone.arch.vocab_size, length=11)
    with torch.no_grad():
        r = loss_fn(clone(ids, terms=loss_fn.request), ids)

    teacher = tiny_teacher(arch)
    t, s = hooked_activations(teacher, ids), hooked_activations(clone.to_hf(), ids)
    proj = dict(clone.named_projections())
    for i in range(clone.arch.num_layers):
        w_down = teacher.model.layers[i].mlp.down_proj.weight
        expected = {
            "attn_in": mse(s[("attn_in", i)] @ proj[f"layers.{i}.qkv"].T, t[("attn_in", i)]),
            "ffn_in": mse(s[("ffn_in", i)] @ proj[f"layers.{i}.gate_up"].T, t[("ffn_in", i)]),
            "down": mse(s[("hidden", i)] @ w_down.T, t[("down", i)]),
        }
        for name, value in expected.items():
            assert s[("attn_in", i)].shape[-1] == 16 and t[("attn_in", i)].shape[-1] == 64
            assert r[f"clone/{name}/{i}"].item() == pytest.approx(value, rel=1e-4), (name, i)
    for name in ("q", "k", "v", "gate", "up"):
        assert f"clone/{name}" not in r
    assert r["clone"].item() == pytest.approx(sum(r[f"clone/{n}"].item() for n in ("o", "down", "attn_in", "ffn_in")),
                                              rel=1e-6)


def test_attn_in_of_the_first_layer_in_closed_form():
    """Layer 0 needs no forward at all: x_t = E[ids], x_s = E[ids] @ Pembed, so attn_in is
    MSE(rms(x_s) g_s @ Pqkv.T, rms(x_t) g_t) with the gains and eps of each model."""
    clone = make_clone("llama", rank=16, attn_sharing="io")
    randomize_trainable(clone, std=0.2)
    loss_fn = LRCLoss(REFERENCE)
    loss_fn.check_sharing("io", "all")
    ids = random_ids(clone.arch.vocab_size, length=7, seed=4)
    with torch.no_grad():
        got = loss_fn(clone(ids, terms=loss_fn.request), ids)["clone/attn_in/0"].item()

    teacher = tiny_teacher("llama")
    eps = teacher.config.rms_norm_eps
    proj, gains = dict(clone.named_projections()), dict(clone.named_student_norms())

    def rms(x, g):
        x = x.double()
        return g.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    emb = teacher.model.embed_tokens.weight.detach()[ids]
    x_t = rms(emb, teacher.model.layers[0].input_layernorm.weight.detach())
    x_s = rms(emb.double() @ proj["embed"].double(), gains["layers.0.attn_norm"].detach())
    expected = ((x_s @ proj["layers.0.qkv"].detach().double().T - x_t) ** 2).mean().item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_reference_terms_vanish_when_the_student_is_a_rotated_teacher():
    """rank = D, every projection one orthogonal Q, gains 1 on a unit-gain teacher: the student is
    the teacher rotated, so attn_in, ffn_in and the teacher-width down are zero (up to fp32), and a
    transposed shared projection breaks attn_in alone."""
    teacher = tiny_teacher("qwen3", unit_norms=True)
    d = teacher.config.hidden_size
    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=d, attn_sharing="io", ffn_sharing="io"))
    q = random_orthogonal(d)
    with torch.no_grad():
        for _, p in clone.named_projections():
            p.copy_(q)
    loss_fn = LRCLoss(REFERENCE)
    loss_fn.check_sharing("io", "io")
    ids = random_ids(teacher.config.vocab_size, length=20)
    with torch.no_grad():
        out = clone(ids, terms=loss_fn.request)
    assert {name for (_, name) in out.clone_terms} == {"o", "down", "attn_in", "ffn_in"}
    assert max(v.item() for v in out.clone_terms.values()) < 1e-9
    with torch.no_grad():
        dict(clone.named_projections())["layers.0.qkv"].copy_(q.T)
        broken = clone(ids, terms=loss_fn.request).clone_terms
    assert broken[(0, "attn_in")].item() > 1e-3


# --------------------------------------------------------------------------- which terms
@pytest.mark.parametrize("sharing", sorted(REFERENCE_TERMS), ids=lambda s: "/".join(s))
def test_terms_follow_the_sharing(sharing):
    """"paper" keeps the seven terms whatever the sharing; "reference" swaps q, k, v for attn_in
    under IO attention and gate, up for ffn_in under an IO FFN (whose down turns teacher-width),
    and changes nothing for all/all. The clone computes exactly those terms."""
    paper = LRCLoss(LossConfig())
    assert paper.check_sharing(*sharing) == CLONE_TERMS and paper.request.ffn_out_space == "student"

    loss_fn = LRCLoss(REFERENCE)
    assert loss_fn.check_sharing(*sharing) == REFERENCE_TERMS[sharing]
    assert loss_fn.request.terms == REFERENCE_TERMS[sharing]
    assert loss_fn.request.ffn_out_space == ("teacher" if sharing[1] == "io" else "student")

    clone = make_clone("llama", rank=16, attn_sharing=sharing[0], ffn_sharing=sharing[1])
    ids = random_ids(clone.arch.vocab_size, length=6)
    with torch.no_grad():
        out = clone(ids, terms=loss_fn.request)
    assert {name for (_, name) in out.clone_terms} == set(REFERENCE_TERMS[sharing])
    assert all(v.isfinite() for v in out.clone_terms.values())


def test_reference_needs_the_sharing_and_weights_still_apply():
    with pytest.raises(ValueError, match=r"shared_projection_terms='reference' depends on the student's projection "
                                         r"sharing: call loss_fn.check_sharing"):
        LRCLoss(REFERENCE).request
    assert LRCLoss(LossConfig()).request.terms == CLONE_TERMS  # "paper" needs no binding
    assert LRCLoss(LossConfig(shared_projection_terms="reference", alpha=0)).request.terms == ()
    weighted = LRCLoss(LossConfig(shared_projection_terms="reference", term_weights={"attn_in": 0, "ffn_in": 2.5}))
    assert weighted.check_sharing("io", "io") == ("o", "down", "ffn_in")
    assert weighted.config.weight("ffn_in") == 2.5


def test_bad_values_are_refused_with_the_key():
    with pytest.raises(ValueError, match=r"LossConfig.shared_projection_terms must be one of \('paper', 'reference'\), "
                                         r"got 'refrence'"):
        LossConfig(shared_projection_terms="refrence")
    detach = LRCLoss(LossConfig(shared_projection_terms="reference", detach_down_target=True))
    with pytest.raises(ValueError, match=r"detach_down_target=True does nothing with shared_projection_terms='reference' "
                                         r"and ffn_sharing='io'"):
        detach.check_sharing("all", "io")
    assert detach.check_sharing("io", "all") == REFERENCE_TERMS[("io", "all")]  # separate Pdown target: fine
    with pytest.raises(ValueError, match=r"CloneConfig.attn_sharing must be 'all' or 'io', got 'qkv'"):
        LRCLoss(REFERENCE).check_sharing("qkv", "all")
    with pytest.raises(ValueError, match=r"TermRequest.ffn_out_space must be one of"):
        TermRequest(ffn_out_space="d")
    # a request for the shared-input term run on a student with separate projections
    clone = make_clone("llama", rank=16)
    with pytest.raises(ValueError, match=r"clone term 'attn_in' needs one shared attn input projection "
                                         r"\(student.attn_sharing=io\)"):
        clone(random_ids(clone.arch.vocab_size, length=5), terms=TermRequest(terms=("attn_in",)))


# --------------------------------------------------------------------------- training
def test_loss_falls_with_the_reference_terms():
    """IO/IO with the reference terms: a few Adam steps on one batch lower the loss and each new term."""
    torch.manual_seed(0)
    clone = make_clone("llama", rank=16, attn_sharing="io", ffn_sharing="io")
    loss_fn = LRCLoss(LossConfig(shared_projection_terms="reference", alpha=1.0))
    loss_fn.check_sharing("io", "io")
    params = [p for _, p in clone.named_trainable()]
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = random_ids(clone.arch.vocab_size, batch=2, length=16, seed=1)
    history = []
    for _ in range(8):
        r = loss_fn(clone(ids, terms=loss_fn.request), ids)
        history.append({k: r[k].item() for k in ("loss", "clone/attn_in", "clone/ffn_in", "clone/down")})
        opt.zero_grad()
        r["loss"].backward()
        grads = {n: p.grad for n, p in clone.named_projections()}
        assert grads["layers.0.qkv"].abs().sum() > 0 and grads["layers.0.gate_up"].abs().sum() > 0
        opt.step()
    first, last = history[0], history[-1]
    assert last["loss"] < 0.8 * first["loss"], history
    for key in ("clone/attn_in", "clone/ffn_in", "clone/down"):
        assert last[key] < first[key], (key, history)


# --------------------------------------------------------------------------- the real CLI
def test_table7_io_cell_with_reference_terms_through_lrc_distill(corpus, tmp_path, capsys):
    """lrc-distill experiment=paper/table7_sharing, IO attention and IO FFN, reference terms, on
    the tiny Llama teacher: it trains, logs attn_in / ffn_in (no q, k, v, gate, up), its logged
    loss is CE + KL + alpha (1, Table 7) x the four terms, and it exports a loadable student."""
    out = tmp_path / "run"
    code, log = cli(capsys, "distill", *cli_args(
        corpus, out, "experiment=paper/table7_sharing", "teacher=tiny_llama", "teacher.source=tiny-llama",
        "teacher.dtype=float32", "trainer=cpu", "student.rank=16", "data.seq_len=32", "data.batch_size=2",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
        "student.attn_sharing=io", "student.ffn_sharing=io", "loss.shared_projection_terms=reference"))
    assert code == 0, log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["steps"] == 4
    config = (out / "config.yaml").read_text()
    assert "shared_projection_terms: reference" in config and "alpha: 1.0" in config
    with (out / "curves.csv").open() as fh:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(fh)]
    trained = [r for r in rows if "train/loss" in r]
    assert trained
    for r in trained:
        assert not any(f"train/clone/{t}" in r for t in ("q", "k", "v", "gate", "up"))
        terms = sum(r[f"train/clone/{t}"] for t in ("o", "down", "attn_in", "ffn_in"))
        assert r["train/clone"] == pytest.approx(terms, rel=1e-4)
        assert r["train/loss"] == pytest.approx(r["train/ce"] + r["train/kl"] + 1.0 * r["train/clone"], rel=1e-4)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.hidden_size == 16
    assert torch.isfinite(student(random_ids(student.config.vocab_size, length=8)).logits).all()


def test_bad_value_through_lrc_distill_is_one_line_before_any_write(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, log = cli(capsys, "distill", *cli_args(corpus, out, "loss.shared_projection_terms=refrence"))
    assert code == 2 and "lrc-distill: error: LossConfig.shared_projection_terms must be one of" in log, log[-2000:]
    assert "Traceback" not in log
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    code, log = cli(capsys, "distill", *cli_args(corpus, tmp_path / "run2", "loss.shared_projection_terms=reference",
                                                 "student.ffn_sharing=io", "loss.detach_down_target=true"))
    assert code == 2 and "lrc-distill: error: LossConfig.detach_down_target=True does nothing" in log, log[-2000:]
    assert not (tmp_path / "run2" / "config.yaml").exists()


def test_table7_sweep_with_reference_terms_gives_each_cell_its_terms():
    """The documented Table 7 sweep with loss.shared_projection_terms=reference: every cell composes
    and its loss computes the reference code's terms for its sharing (All/All: the seven)."""
    from test_paper_experiments import compose_exp, documented_sweep

    readme = (Path(__file__).parents[1] / "experiments" / "README.md").read_text()
    assert ("lrc-distill -m experiment=paper/table7_sharing loss.shared_projection_terms=reference seed=0,1 "
            "hydra.sweep.dir=multirun/table7_reference") in readme
    assert compose_exp("experiment=paper/table7_sharing")["loss"]["shared_projection_terms"] == "paper"
    cells = {}
    for job in documented_sweep("paper/table7_sharing"):
        cfg = compose_exp(*job, "loss.shared_projection_terms=reference")
        sharing = (cfg["student"]["attn_sharing"], cfg["student"]["ffn_sharing"])
        cells[sharing] = LRCLoss(LossConfig(**cfg["loss"])).check_sharing(*sharing)
    assert cells == REFERENCE_TERMS
