"""``lrc-estimate`` and :mod:`lrc.estimate`: parameter counts equal those of really built clones,
FLOPs per token equal a hand count on a tiny shape, and the CLI prints them from the config alone."""

from __future__ import annotations

import pytest
from clone_utils import ARCHS, make_clone

from lrc.cli.estimate import main
from lrc.estimate import LossPlan, StudentPlan, TeacherShape, flops_per_token, memory_per_device, parameter_counts
from lrc.methods.lrc import LRCModule

VARIANTS = [
    dict(),
    dict(attn_sharing="io", ffn_sharing="io", tie_head_projection=False, layers={"every": 2}),
    dict(teacher_kwargs={"tie_word_embeddings": False}, layers=[0, -1]),
]


def _real_counts(clone) -> dict[str, int]:
    teacher_params = {id(p): p.numel() for layer in clone.layers for p in layer.teacher.values()}
    io = clone.io
    for p in (io.teacher_embed, io.teacher_head, io.teacher_final_norm):
        if p is not None:
            teacher_params[id(p)] = p.numel()
    return {
        "frozen": sum(teacher_params.values()),
        "projections": sum(p.numel() for _, p in clone.named_projections()),
        "gains": sum(p.numel() for _, p in clone.named_student_norms()),
        "alignments": sum(p.numel() for _, p in clone.named_alignments()),
        "trainable": sum(p.numel() for _, p in clone.named_trainable()),
        "deployed": sum(p.numel() for p in clone.to_hf().parameters()),
    }


def _plan(clone, learned=False) -> StudentPlan:
    return StudentPlan(clone.config.rank, tuple(clone.student_layers), clone.config.attn_sharing,
                       clone.config.ffn_sharing, clone.io.proj_head is None, learned)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_parameter_counts_equal_a_built_clone(arch, variant):
    clone = make_clone(arch, rank=8, **VARIANTS[variant])
    shape = TeacherShape.from_config(clone.teacher_config)
    assert parameter_counts(shape, _plan(clone)) == _real_counts(clone)


def test_parameter_counts_with_learned_alignment():
    from lrc.model import CloneConfig, LowRankClone
    from lrc.teachers import tiny_teacher

    clone = LowRankClone.from_teacher(tiny_teacher("qwen3"), CloneConfig(rank=8), output_alignment="learned")
    shape = TeacherShape.from_config(clone.teacher_config)
    assert parameter_counts(shape, _plan(clone, learned=True)) == _real_counts(clone)


TINY = TeacherShape("llama", layers=1, hidden=4, heads=2, kv_heads=1, head_dim=2, ffn=6, vocab=10, tied=True,
                    qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)


def test_flops_per_token_by_hand():
    # teacher D=4, H*h=4, K*h=2, I=6, V=10, one layer; student d=2; seq 3, 6 tokens per forward
    student = StudentPlan(rank=2, kept_layers=(0,), projection_path="materialise")
    f = flops_per_token(TINY, student, LossPlan(), seq_len=3, tokens_per_forward=6)
    # teacher: matrices 4*(2*4 + 2*2 + 3*6) = 120, head 40 -> 2*160 = 320; attention 4*4*3 = 48
    assert f["teacher_forward"] == 320 + 48
    # plain student: matrices 2*(2*4 + 2*2 + 3*6) = 60, head 20 -> 160; attention 48; embedding E[ids] @ P: 2*4*2 = 16
    assert f["student_forward"] == 160 + 48 + 16
    assert f["student_backward"] == 2 * (160 + 48) + 16
    # products, forward + P's gradient: 4*D*d*(sum of inner widths 4+2+2+4+6+6+6 = 30) = 960 per forward,
    # head 4*V*D*d = 320; over 6 tokens
    assert f["weight_products"] == pytest.approx((960 + 320) / 6)
    # o in teacher space: 4*H*h*D = 64; down's projected target: 2*D*d*2 = 32
    assert f["clone_terms"] == 64 + 32
    assert f["unavoidable"] == 368 + 3 * 208
    assert f["total"] == pytest.approx(368 + 224 + 432 + 1280 / 6 + 96)


def test_flops_follow_the_projection_path_and_terms():
    factored = StudentPlan(rank=2, kept_layers=(0,), projection_path="factored")
    f = flops_per_token(TINY, factored, LossPlan(terms=("q",)), seq_len=3, tokens_per_forward=6)
    # factored minus a plain apply per projection: 6ndD + 4nDs - 6nds, summed over q,k,v,o,gate,up,down
    n, big, d = 6, 4, 2
    extra = sum(6 * n * d * big + 4 * n * big * s - 6 * n * d * s for s in (4, 2, 2, 4, 6, 6, 6))
    assert f["weight_products"] == pytest.approx((extra + 4 * 10 * big * d) / n)
    assert f["clone_terms"] == 0  # q costs no extra product


def test_memory_sharding():
    student = StudentPlan(rank=2, kept_layers=(0,))
    one = memory_per_device(TINY, student, tokens_per_forward=6)["off"]
    ddp = memory_per_device(TINY, student, tokens_per_forward=6, strategy="ddp", devices=4)["off"]
    fsdp = memory_per_device(TINY, student, tokens_per_forward=6, strategy="fsdp", devices=4)["off"]
    counts = parameter_counts(TINY, student)
    assert one["teacher"] == ddp["teacher"] == counts["frozen"] * 4 == 4 * fsdp["teacher"]
    assert one["adam_state"] == 2 * counts["trainable"] * 4 == 4 * fsdp["adam_state"]
    assert one["activations"] == ddp["activations"] == fsdp["activations"]


@pytest.mark.parametrize("terms", [("q", "k", "v", "o", "gate", "up", "down"), ("attn_in", "ffn_in", "down"),
                                   ("v", "o")])
def test_student_checkpointing_keeps_the_widths_of_the_real_teacher_targets(terms):
    """The estimator's target widths against the widths of the activations a real teacher layer
    gives its clone terms."""
    import torch

    from lrc.estimate import teacher_target_width
    from lrc.losses import teacher_activations_read
    from lrc.model.functional import decoder_layer

    clone = make_clone("qwen2", rank=8)
    shape = TeacherShape.from_config(clone.teacher_config)
    layer = clone.layers[0]
    x = torch.randn(1, 5, shape.hidden)
    cos, sin = clone.rotary(x, torch.arange(5)[None])
    _, acts = decoder_layer(x, layer.teacher, layer.shape, cos, sin, None, layer.teacher_eps)
    read = teacher_activations_read(terms)
    assert teacher_target_width(shape, terms) == sum(acts[k].shape[-1] for k in read)
    # kept per token on top of "full": the targets of every layer that carries terms, in the compute dtype
    student = StudentPlan(rank=8, kept_layers=tuple(range(shape.layers)))
    for clone_layers in (None, 1):
        mem = memory_per_device(shape, student, tokens_per_forward=6, compute_bytes=2,
                                loss=LossPlan(terms=terms, clone_layers=clone_layers))
        layers = shape.layers if clone_layers is None else clone_layers
        assert mem["student"]["activations"] - mem["full"]["activations"] == 6 * 2 * layers * sum(
            acts[k].shape[-1] for k in read)
        assert mem["full"]["total"] < mem["student"]["total"]


def test_cli_counts_from_the_config(capsys):
    assert main(["teacher=tiny_qwen2", "student.rank=8", "student.attn_sharing=io", "student.init=normal"]) == 0
    printed = capsys.readouterr().out
    clone = make_clone("qwen2", rank=8, attn_sharing="io")
    real = _real_counts(clone)
    assert f"trainable {real['trainable']:,}" in printed
    assert f"deployed {real['deployed']:,}" in printed and f"frozen {real['frozen']:,}" in printed
    assert "single on 1 device(s)" in printed


def test_cli_fsdp_and_bad_input(capsys):
    assert main(["teacher=tiny_llama", "student.rank=16", "trainer=ddp", "trainer.accelerator=cpu",
                 "trainer.devices=4"]) == 0
    assert "ddp on 4 device(s)" in capsys.readouterr().out
    assert main(["teacher=tiny_llama", "student.rank=16", "trainer=fsdp", "trainer.accelerator=cpu",
                 "trainer.devices=2", "trainer.strategy.activation_checkpointing=student"]) == 0
    printed = capsys.readouterr().out
    assert "fsdp on 2 device(s)" in printed
    assert [line.split(" with ")[1].split(":")[0] for line in printed.splitlines() if "GiB with" in line] == [
        "activation_checkpointing=off", "activation_checkpointing=full",
        "activation_checkpointing=student (configured)"]
    assert main(["teacher=tiny_llama", "student.rank=16", "trainer=fsdp", "trainer.accelerator=cpu",
                 "trainer.devices=2", "trainer.strategy.activation_checkpointing=teacher"]) == 2
    assert "activation_checkpointing must be" in capsys.readouterr().err
    assert main(["teacher=tiny_llama", "student.rank=1000"]) == 2
    assert "CloneConfig.rank" in capsys.readouterr().err
    assert main(["method=kd"]) == 2


def test_estimate_matches_what_the_module_checks():
    # the estimator validates the same settings lrc-distill does (a rank the export refuses)
    from lrc.teachers import tiny_config

    with pytest.raises(ValueError):
        LRCModule.check_settings(tiny_config("llama"), {"rank": 10}, {})
    assert main(["teacher=tiny_llama", "student.rank=10"]) == 2
