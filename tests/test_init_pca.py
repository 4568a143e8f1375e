"""The data-aware ``init: pca``: its basis against an independent eigendecomposition, the rank = D
identity on every architecture, a head start over the normal init, and the calibration plumbing."""

from __future__ import annotations

import json

import pytest
import torch
from clone_utils import ARCHS, random_ids

from lrc.losses import next_token_cross_entropy
from lrc.model import CloneConfig, LowRankClone
from lrc.model.pca import pca_basis
from lrc.teachers import tiny_teacher


def norm_inputs_by_hand(teacher, ids) -> list[torch.Tensor]:
    """Every layer's attention-norm input (transformers' hidden state entering the layer) and
    FFN-norm input (that plus the attention block's output), as fp64 (tokens, D)."""
    attn_out = {}
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: attn_out.__setitem__(i, out[0].detach()))
        for i, layer in enumerate(teacher.model.layers)
    ]
    with torch.no_grad():
        hidden = teacher(ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    sites = []
    for i in range(teacher.config.num_hidden_layers):
        sites += [hidden[i], hidden[i] + attn_out[i]]
    return [x.double().reshape(-1, x.shape[-1]) for x in sites]


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt(x.pow(2).mean(-1) + eps)


# ------------------------------------------------------------------------------- the basis
def test_pca_basis_and_projections_against_an_independent_eigendecomposition():
    teacher = tiny_teacher("qwen2", seed=3)
    eps, rank = teacher.config.rms_norm_eps, 16
    ids = random_ids(teacher.config.vocab_size, batch=4, length=24, seed=1)
    sites = norm_inputs_by_hand(teacher, ids)
    normalised = torch.cat([x / rms(x, eps)[:, None] for x in sites])
    evals, evecs = torch.linalg.eigh(normalised.t() @ normalised / normalised.shape[0])
    evals, evecs = evals.flip(0), evecs.flip(1)
    assert evals[rank - 1] - evals[rank] > 1e-3 * evals[0]  # a gap: the top subspace is well defined
    ref = evecs[:, :rank]

    q = pca_basis(teacher, ids, rank)
    assert q.shape == (64, rank) and q.dtype == torch.float32
    assert torch.allclose(q.double().t() @ q.double(), torch.eye(rank, dtype=torch.float64), atol=1e-5)
    # the same columns up to sign, in decreasing eigenvalue order
    assert torch.allclose((q.double() * ref).sum(0).abs(), torch.ones(rank, dtype=torch.float64), atol=1e-4)
    assert torch.equal(pca_basis(teacher, ids, rank), q)  # deterministic, signs included

    clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=rank, init="pca"), calibration_ids=ids)
    proj = dict(clone.named_projections())
    layer = teacher.model.layers[1]
    g_attn, g_mlp = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
    for name, expected in {
        "embed": q, "layers.1.o": q, "layers.1.down": q,
        "layers.1.q": g_attn[:, None] * q, "layers.1.v": g_attn[:, None] * q,
        "layers.1.gate": g_mlp[:, None] * q, "layers.1.up": g_mlp[:, None] * q,
        "head": teacher.model.norm.weight[:, None] * q,
    }.items():
        assert torch.allclose(proj[name], expected, atol=1e-6), name
    # student gains: the mean over tokens of the RMS ratio rms_d(x Q) / rms_D(x) at that norm
    gains = dict(clone.named_student_norms())
    for k, name in enumerate(("layers.0.attn_norm", "layers.0.mlp_norm", "layers.2.attn_norm", "layers.2.mlp_norm")):
        x = sites[{0: 0, 1: 1, 2: 4, 3: 5}[k]]
        ratio = (rms(x @ q.double(), eps) / rms(x, eps)).mean()
        assert torch.allclose(gains[name].double(), ratio.expand(rank), rtol=1e-5), name
        # sqrt(f D / d) with f the energy the top 16 of 64 directions keep: f in (1/4, 1)
        assert 1.0 < ratio < 2.0


# --------------------------------------------------------------------------- rank = D identity
@pytest.mark.parametrize("arch,sharing", [(arch, "all") for arch in ARCHS] + [("qwen3", "io")])
def test_pca_at_full_rank_reproduces_the_teacher(arch, sharing):
    """Non-unit norm gains (and Qwen2's biases, Qwen3's q/k norms, Llama-3 rope): at rank = D the
    pca-initialised student's logits equal the teacher's, in the clone and in the export."""
    teacher = tiny_teacher(arch, seed=3)
    d = teacher.config.hidden_size
    calibration = random_ids(teacher.config.vocab_size, batch=4, length=24, seed=1)
    config = CloneConfig(rank=d, init="pca", attn_sharing=sharing, ffn_sharing=sharing)
    clone = LowRankClone.from_teacher(teacher, config, calibration_ids=calibration)
    assert "head" in dict(clone.named_projections())  # untied from the embedding's by default
    ids = random_ids(teacher.config.vocab_size, length=30, seed=2)
    with torch.no_grad():
        ref = teacher(ids).logits
        out = clone(ids)
        exported = clone.to_hf()(ids).logits
    scale = ref.abs().max()
    assert (out.student_logits - ref).abs().max() <= 1e-4 * scale
    assert (exported - ref).abs().max() <= 1e-4 * scale
    for name, g in clone.named_student_norms():
        assert torch.allclose(g, torch.ones_like(g), atol=1e-5), name
    q = dict(clone.named_projections())["embed"]
    assert not torch.allclose(q.abs(), torch.eye(d), atol=0.1)  # a real rotation, not the identity


# ------------------------------------------------------------------------ a head start at rank < D
def structured_teacher(seed: int = 0):
    """A tiny Llama whose embedding (tied head) lies mostly in a 12-dimensional subspace at a scale
    that makes its predictions confident, like a trained model's anisotropic residual stream."""
    teacher = tiny_teacher("llama", seed=seed)
    e = teacher.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        low = torch.randn(e.shape[0], 12, generator=g) @ torch.randn(12, e.shape[1], generator=g) / 12**0.5
        e.copy_(0.5 * low + 0.02 * torch.randn(e.shape, generator=g))
    return teacher


def test_pca_starts_with_a_better_held_out_ce_than_normal():
    teacher = structured_teacher()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, teacher.config.vocab_size, (24, 1), generator=g)
    with torch.no_grad():  # the teacher's own samples: text it predicts well
        for _ in range(23):
            probs = teacher(text).logits[:, -1].softmax(-1)
            text = torch.cat([text, torch.multinomial(probs, 1, generator=g)], 1)
    calibration, held_out = text[:16], text[16:]
    ce = {}
    for init in ("normal", "pca"):
        clone = LowRankClone.from_teacher(teacher, CloneConfig(rank=8, init=init), calibration_ids=calibration)
        with torch.no_grad():
            out = clone(held_out)
        ce[init] = next_token_cross_entropy(out.student_logits, held_out).item()
        ce["teacher"] = next_token_cross_entropy(out.teacher_logits, held_out).item()
    assert ce["teacher"] < ce["pca"] < ce["normal"] - 1.0, ce


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_in_one_teacher_pass_equals_two(arch):
    """Keeping the norm inputs of the basis's pass for the gains gives the two-pass numbers exactly,
    running the teacher over the calibration ids once instead of twice."""
    from lrc.model.pca import pca_calibration

    teacher = tiny_teacher(arch)
    ids = random_ids(teacher.config.vocab_size, batch=5, length=12)
    passes = []
    hook = teacher.model.register_forward_pre_hook(lambda m, a, kw: passes.append(1), with_kwargs=True)
    chunks = -(-ids.shape[0] // 8)  # the calibration's batch_size of 8 sequences
    one = pca_calibration(teacher, ids, rank=6, student_eps=1e-5)
    assert len(passes) == chunks
    two = pca_calibration(teacher, ids, rank=6, student_eps=1e-5, keep_bytes=0)
    assert len(passes) == 3 * chunks
    hook.remove()
    assert torch.equal(one.data["basis"], two.data["basis"])
    assert one.gains == two.gains and len(one.gains) == 2 * teacher.config.num_hidden_layers + 1


def test_pca_needs_calibration_ids_and_an_untied_head():
    teacher = tiny_teacher("llama")
    with pytest.raises(ValueError, match=r"init='pca' needs calibration data: pass calibration_ids="):
        LowRankClone.from_teacher(teacher, CloneConfig(rank=8, init="pca"))
    with pytest.raises(ValueError, match="gives the head a projection of its own: set tie_head_projection"):
        LowRankClone.from_teacher(
            teacher, CloneConfig(rank=8, init="pca", tie_head_projection=True), calibration_ids=random_ids(259)
        )
    with pytest.raises(ValueError, match=r"calibration_ids must be token ids in \[0, 258\]"):
        LowRankClone.from_teacher(teacher, CloneConfig(rank=8, init="pca"), calibration_ids=torch.full((2, 4), 300))
    with pytest.raises(ValueError, match="calibration_ids must hold integer token ids"):
        LowRankClone.from_teacher(teacher, CloneConfig(rank=8, init="pca"), calibration_ids=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="init_calibration_sequences must be an integer >= 1"):
        LowRankClone.from_teacher(teacher, CloneConfig(rank=8, init="pca", init_calibration_sequences=0))
    # data-free inits ignore calibration ids
    a = LowRankClone.from_teacher(teacher, CloneConfig(rank=8), calibration_ids=random_ids(259))
    b = LowRankClone.from_teacher(teacher, CloneConfig(rank=8))
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a.named_trainable(), b.named_trainable()))


# ----------------------------------------------------------------- calibration through training
def test_distill_module_calibrates_pca_on_the_first_training_sequences(tmp_path):
    import lightning as L

    from lrc.data.datamodule import TokenMixDataModule
    from lrc.teachers import tiny_tokenizer
    from lrc.methods.lrc import LRCModule

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "some plain words " * (i % 5 + 2)}) + "\n"
                            for i in range(60)))

    def datamodule():
        return TokenMixDataModule([{"name": "a", "kind": "jsonl", "path": str(path)}], tokenizer=tiny_tokenizer(),
                                  seq_len=16, batch_size=4, seed=3, cache_dir=str(tmp_path / "cache"))

    dm = datamodule()
    dm.setup("fit")
    first = [row for batch in dm.train_dataloader() for row in batch["input_ids"]][:6]
    calibration = dm.calibration_batch(6)
    assert torch.equal(calibration, torch.stack(first))  # the first training sequences, in order
    assert [b["input_ids"] for b in dm.train_dataloader()][0].tolist() == [r.tolist() for r in first[:4]]

    teacher = {"source": "tiny-llama", "dtype": "float32", "tiny": {"num_layers": 2}}
    student = {"rank": 16, "init": "pca", "init_calibration_sequences": 6}
    module = LRCModule(teacher=teacher, student=student)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.validate(module, datamodule=datamodule(), verbose=False)
    expected = LowRankClone.from_teacher(tiny_teacher("llama", num_layers=2), CloneConfig(**student),
                                         calibration_ids=calibration)
    for (name, p), (_, e) in zip(module.clone.named_trainable(), expected.named_trainable()):
        assert torch.equal(p, e), name

    class NoCalibration(L.LightningDataModule):
        def val_dataloader(self):
            return [{"input_ids": calibration[:2]}]

    with pytest.raises(ValueError, match=r"student.init='pca' needs calibration data"):
        trainer.validate(LRCModule(teacher=teacher, student=student), datamodule=NoCalibration(), verbose=False)


def test_lrc_distill_with_pca_at_full_rank_starts_at_the_teacher(tmp_path, capsys):
    """The real lrc-distill: init=pca calibrates on the training data, and at rank = D the
    validation before any step gives the teacher's CE and a zero KL; the run trains and exports."""
    from test_cli import cli, cli_args, write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "run"
    code, log = cli(capsys, "distill", *cli_args(corpus, out, "student.rank=64", "student.init=pca",
                                                 "student.init_calibration_sequences=4", "trainer.max_steps=2"))
    assert code == 0, log
    metrics = json.loads((out / "metrics.json").read_text())
    before = metrics["val_before"]
    assert before["ce"] == pytest.approx(before["teacher_ce"], abs=2e-4)
    assert abs(before["kl"]) < 1e-3 and before["top1_agreement"] == 1.0
    exported = json.loads((out / "student" / "config.json").read_text())
    assert exported["hidden_size"] == 64 and exported["tie_word_embeddings"] is False
    # lrc-export rebuilds the student from the checkpoint alone: no calibration data needed
    code, log = cli(capsys, "export", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'again'}")
    assert code == 0, log
    from safetensors.torch import load_file

    ours, again = load_file(out / "student" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
