"""Teacher-layer selection for any teacher (lrc.layer_select): every form of a layer spec against
closed-form index lists, its use for student.layers (layer_stride kept as an alias) and for
loss.clone_layers (patterns pick among the student's kept layers), and errors naming the key."""

from __future__ import annotations

import pytest
from clone_utils import make_clone, random_ids

from lrc.layer_select import check_layer_spec, select_layers
from lrc.losses import LossConfig, LRCLoss, resolve_clone_layers
from lrc.model import CloneConfig


@pytest.mark.parametrize(
    "spec,n,expected",
    [
        (None, 3, [0, 1, 2]),
        ([2, 0], 4, [0, 2]),
        ([-1], 30, [29]),
        ([0, -1, 5], 28, [0, 5, 27]),
        ({"every": 2}, 30, list(range(0, 30, 2))),
        ({"every": 3}, 28, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]),
        ({"every": 4, "offset": 3}, 36, [3, 7, 11, 15, 19, 23, 27, 31, 35]),
        ({"every": 5}, 4, [0]),
        ({"first": 3}, 28, [0, 1, 2]),
        ({"last": 3}, 28, [25, 26, 27]),
        ({"last": 4}, 4, [0, 1, 2, 3]),
        # fraction: m = max(1, floor(f * n + 1/2)) layers at floor(j * n / m)
        ({"fraction": 0.5}, 30, list(range(0, 30, 2))),  # 15 of 30: every other layer
        ({"fraction": 0.5}, 28, list(range(0, 28, 2))),  # 14 of 28
        ({"fraction": 0.5}, 5, [0, 1, 3]),  # 2.5 rounds up to 3: floor(5j/3) = 0, 1, 3
        ({"fraction": 0.25}, 30, [0, 3, 7, 11, 15, 18, 22, 26]),  # 7.5 -> 8: floor(30j/8)
        ({"fraction": 0.125}, 28, [0, 7, 14, 21]),  # 3.5 -> 4: floor(28j/4)
        ({"fraction": 0.75}, 4, [0, 1, 2]),  # 3 of 4
        # 14.5 -> 15 layers, though 0.58 * 25 is 14.499999999999998 in floats
        ({"fraction": 0.58}, 25, [0, 1, 3, 5, 6, 8, 10, 11, 13, 15, 16, 18, 20, 21, 23]),
        ({"fraction": 0.01}, 30, [0]),  # always at least one layer
        ({"fraction": 1}, 4, [0, 1, 2, 3]),
    ],
)
def test_select_layers_closed_form(spec, n, expected):
    assert select_layers(spec, n) == expected


@pytest.mark.parametrize("n", [1, 2, 7, 16, 28, 30, 36])
@pytest.mark.parametrize("f", [0.1, 0.125, 0.25, 1 / 3, 0.5, 0.75, 1.0])
def test_fraction_count_and_spread(f, n):
    """Exactly max(1, round-half-up(f n)) distinct layers, layer 0 first, gaps differing by at most one."""
    got = select_layers({"fraction": f}, n)
    m = max(1, int(f * n + 0.5 + 1e-9))
    assert len(got) == len(set(got)) == m and got[0] == 0 and got == sorted(got) and got[-1] < n
    gaps = {b - a for a, b in zip(got, got[1:])} | {n - got[-1]}
    assert max(gaps) - min(gaps) <= 1


@pytest.mark.parametrize(
    "spec,n,match",
    [
        ([], 4, r"key is empty"),
        ([0, 4], 4, r"key has indices out of range \[-4, 3\] \(4 layers\): \[4\]"),
        ([-5], 4, r"out of range \[-4, 3\] \(4 layers\): \[-5\]"),
        ([1, -3], 4, r"key has duplicated indices .*: \[1\]"),
        ([0, 1.5], 4, r"key must hold integer layer indices, got \[1.5\]"),
        ("0,2", 4, r"key must be null \(all\), a list of indices, \{every: k"),
        ({"every": 0}, 4, r"key.every must be an integer >= 1, got 0"),
        ({"every": 2, "offset": 4}, 4, r"key.offset must be below the 4 layers, got 4"),
        ({"every": 2, "offset": -1}, 4, r"key.offset must be an integer >= 0"),
        ({"first": 2, "offset": 1}, 4, r"key.offset only goes with key.every"),
        ({"first": 5}, 4, r"key.first must be at most the 4 layers, got 5"),
        ({"last": 0}, 4, r"key.last must be an integer >= 1"),
        ({"fraction": 0}, 4, r"key.fraction must be a number in \(0, 1\], got 0"),
        ({"fraction": 1.5}, 4, r"key.fraction must be a number in \(0, 1\]"),
        ({"fraction": 0.5, "first": 2}, 4, r"exactly one of every, first, last, fraction"),
        ({"evry": 2}, 4, r"unknown keys \['evry'\]"),
    ],
)
def test_bad_specs_name_the_key(spec, n, match):
    with pytest.raises(ValueError, match=match):
        select_layers(spec, n, key="key")


def test_form_is_checked_without_the_layer_count():
    check_layer_spec([0, -1], "k")  # the range needs the count: not judged here
    with pytest.raises(ValueError, match=r"k.fraction must be a number in \(0, 1\]"):
        check_layer_spec({"fraction": 2}, "k")


# ------------------------------------------------------------------------------ student.layers
@pytest.mark.parametrize(
    "config,kept",
    [
        ({"layers": {"every": 2}}, [0, 2]),
        ({"layers": {"every": 2, "offset": 1}}, [1, 3]),
        ({"layers": {"last": 1}}, [3]),
        ({"layers": {"fraction": 0.5}}, [0, 2]),
        ({"layers": [-1, 0]}, [0, 3]),
        ({"layer_stride": 3}, [0, 3]),  # the deprecated alias of {every: 3}
    ],
)
def test_student_layers_take_every_form(config, kept):
    clone = make_clone("llama", rank=8, **config)  # the tiny teacher has 4 layers
    assert clone.student_layers == kept
    assert [layer.index for layer in clone.layers if layer.is_student] == kept
    assert CloneConfig(rank=8, **config).kept_layers(4) == kept


def test_student_layer_errors_name_the_key():
    with pytest.raises(ValueError, match=r"CloneConfig.layers.first must be at most the 4 layers"):
        CloneConfig(rank=8, layers={"first": 6}).validate(64, 4)
    with pytest.raises(ValueError, match="at most one of 'layers' and 'layer_stride'"):
        CloneConfig(rank=8, layers={"every": 2}, layer_stride=2).validate(64, 4)
    assert CloneConfig(rank=8, layers={"every": 2}).to_dict()["layers"] == {"every": 2}


# ------------------------------------------------------------------------------ loss.clone_layers
@pytest.mark.parametrize(
    "spec,kept,expected",
    [
        (None, [0, 2, 4, 6], None),
        ([2, 6], [0, 2, 4, 6], (2, 6)),  # a list names teacher layers
        ([-1], [0, 2, 4, 7], (7,)),  # ... counted from the teacher's end (8 layers)
        ({"fraction": 0.5}, [0, 2, 4, 6], (0, 4)),  # a pattern picks among the kept layers
        ({"fraction": 0.5}, list(range(8)), (0, 2, 4, 6)),
        ({"first": 1}, [3, 5, 7], (3,)),
        ({"last": 2}, [0, 2, 4, 6], (4, 6)),
        ({"every": 2, "offset": 1}, [0, 2, 4, 6], (2, 6)),
    ],
)
def test_clone_layers_resolve_against_the_kept_layers(spec, kept, expected):
    assert resolve_clone_layers(spec, kept, num_teacher_layers=8) == expected


def test_clone_layers_that_are_not_kept_or_not_resolvable():
    with pytest.raises(ValueError, match=r"LossConfig.clone_layers \[1\] are not layers the student keeps \[0, 2\]"):
        resolve_clone_layers([1], [0, 2], 4)
    with pytest.raises(ValueError, match=r"LossConfig.clone_layers.first must be at most the 2 layers"):
        resolve_clone_layers({"first": 3}, [0, 2], 4)
    with pytest.raises(ValueError, match=r"LossConfig.clone_layers has indices out of range \[-4, 3\]"):
        resolve_clone_layers([-5], [0, 1, 2, 3], 4)
    with pytest.raises(ValueError, match=r"LossConfig.clone_layers.fraction must be a number in \(0, 1\]"):
        LossConfig(clone_layers={"fraction": 0})


def test_a_pattern_is_bound_to_the_student_before_the_forward():
    """loss.clone_layers={fraction: 0.5} on a student keeping {every: 2} of 4 layers ([0, 2]):
    terms on kept layer 0 only (one of two); the request is unusable until bound."""
    clone = make_clone("llama", rank=8, layers={"every": 2})
    loss_fn = LRCLoss(LossConfig(clone_layers={"fraction": 0.5}))
    with pytest.raises(ValueError, match=r"loss_fn.check_layers\(clone.student_layers, num_teacher_layers\)"):
        loss_fn.request
    assert loss_fn.check_layers(clone.student_layers, clone.arch.num_layers) == (0,)
    ids = random_ids(clone.arch.vocab_size)
    out = clone(ids, terms=loss_fn.request)
    assert {layer for layer, _ in out.clone_terms} == {0}
    terms = loss_fn(out, ids)
    assert "clone/q/0" in terms and "clone/q/2" not in terms
    # a plain list of kept teacher layers needs no binding (as before)
    assert LRCLoss(LossConfig(clone_layers=[2])).request.layers == (2,)


def test_lrc_distill_puts_clone_terms_on_the_selected_layers(tmp_path):
    """Through the real CLI (tiny 4-layer teacher): student.layers={last: 3} keeps [1, 2, 3] and
    loss.clone_layers={fraction: 0.67} puts terms on 2 of them, floor(3j/2) = positions 0 and 1,
    i.e. teacher layers 1 and 2: the per-layer columns of the run's metrics say so."""
    from test_cli import compose_cfg, tiny_overrides, write_corpus

    from lrc.cli.distill import run

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "run"
    run(compose_cfg(tiny_overrides(corpus, out, "student.layers={last: 3}", "loss.clone_layers={fraction: 0.67}",
                                   "log.per_layer_every_n_steps=1", "trainer.max_steps=1", "validate_before=false",
                                   "export.enabled=false")))
    columns = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert sorted({c.rsplit("/", 1)[1] for c in columns if c.startswith("train_layers/clone/q/")}) == ["1", "2"]
