"""Packing, segment ids and the mixture schedule, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from datatest_utils import EOS, byte_ids

from lrc.data.packing import (
    OnlineInterleaver,
    StreamPacker,
    interleave,
    mixture_counts,
    pack_documents,
    position_ids_from_segments,
    segment_ids,
    token_dtype,
    tokenize_documents,
)


def test_pack_documents_by_hand():
    # stream: 1 2 3 | 0 4 5 0 | 6 0   (0 = eos) -> two chunks of 4, the trailing "0" is dropped
    p = pack_documents([[1, 2, 3], [4, 5], [6]], eos_id=0, seq_len=4)
    assert p.n_chunks == 2
    assert p.chunk(0).tolist() == [1, 2, 3, 0]
    assert p.chunk(1).tolist() == [4, 5, 0, 6]
    assert p.doc_starts.tolist() == [0, 4, 7]
    assert p.chunk_segments(0).tolist() == [0, 0, 0, 0]
    # chunk 1 starts with document 2 (starting at the cut: segment 0), document 3 starts at 7
    assert p.chunk_segments(1).tolist() == [0, 0, 0, 1]


def test_pack_continuing_document_and_eos_belongs_to_its_document():
    # doc A = 5 tokens, doc B = 1 token, seq_len 4: A A A A | A eos B eos
    p = pack_documents([[7, 7, 7, 7, 7], [9]], eos_id=0, seq_len=4)
    assert p.chunk(1).tolist() == [7, 0, 9, 0]
    # the continuation of A is segment 0, its eos too; B and its eos are segment 1
    assert p.chunk_segments(1).tolist() == [0, 0, 1, 1]


def test_pack_tokenized_text(tok):
    ids = tokenize_documents(["ab", "cde", "f"], tok)
    assert ids == [byte_ids("ab"), byte_ids("cde"), byte_ids("f")]
    p = pack_documents(ids, tok.eos_token_id, seq_len=3)
    # a b <eos> | c d e | <eos> f <eos>
    assert [p.chunk(i).tolist() for i in range(p.n_chunks)] == [
        [97, 98, EOS], [99, 100, 101], [EOS, 102, EOS]
    ]
    assert p.chunk_segments(1).tolist() == [0, 0, 0]  # "cde" starts exactly at the cut
    assert p.chunk_segments(2).tolist() == [0, 1, 1]


def test_pack_drops_only_the_incomplete_tail_and_handles_empty_input():
    p = pack_documents([[1, 2]], eos_id=0, seq_len=4)  # 3 tokens < one chunk
    assert p.n_chunks == 0 and p.tokens.size == 0 and p.doc_starts.size == 0
    assert pack_documents([], eos_id=0, seq_len=4).n_chunks == 0
    with pytest.raises(ValueError, match="seq_len"):
        pack_documents([[1]], eos_id=0, seq_len=0)


def test_stream_packer_equals_pack_documents():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, size=int(rng.integers(0, 23))).tolist() for _ in range(60)]
    for seq_len in (1, 2, 5, 16, 64):
        ref = pack_documents(docs, eos_id=0, seq_len=seq_len)
        packer = StreamPacker(0, seq_len)
        got = [c for d in docs for c in packer.feed(d)]
        assert len(got) == ref.n_chunks
        for i, (tokens, seg) in enumerate(got):
            assert tokens.tolist() == ref.chunk(i).tolist()
            assert seg.tolist() == ref.chunk_segments(i).tolist()


def test_segment_ids_and_position_ids():
    starts = np.array([0, 3, 4, 9])
    assert segment_ids(starts, 2, 5).tolist() == [0, 1, 2, 2, 2]
    seg = np.array([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert position_ids_from_segments(seg).tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4]]


def test_token_dtype():
    assert token_dtype(259) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(151_936) == np.uint32


@pytest.mark.parametrize(
    "available, weights, budgets, total, expected",
    [
        ([100, 100], [2.0, 1.0], [None, None], None, [100, 50]),   # the first source sets the size
        ([100, 10], [2.0, 1.0], [None, None], None, [20, 10]),     # the scarce second one does
        ([100, 10], [None, None], [None, None], None, [100, 10]),  # no weights: everything
        ([100, 10], [None, None], [30, 50], None, [30, 10]),       # budgets cap, never exceed availability
        ([100, 40], [3.0, None], [None, 25], None, [100, 25]),     # budget + weight
        ([100, 50], [2.0, 1.0], [None, None], 30, [20, 10]),       # total cap keeps the proportions
        ([10, 10, 10], [1.0, 1.0, 1.0], [None] * 3, 10, [4, 3, 3]),  # largest remainder
    ],
)
def test_mixture_counts(available, weights, budgets, total, expected):
    assert mixture_counts(available, weights, budgets, total) == expected


def _max_prefix_deviation(labels: np.ndarray, counts: list[int]) -> float:
    n = len(labels)
    t = np.arange(1, n + 1)
    return max(np.abs(np.cumsum(labels == i) - t * c / n).max() for i, c in enumerate(counts))


def test_interleave_exact_counts_and_prefix_proportions():
    rng = np.random.default_rng(1)
    for _ in range(200):
        k = int(rng.integers(2, 6))
        counts = rng.integers(0, 120, size=k).tolist()
        if sum(counts) == 0:
            continue
        labels = interleave(counts, seed=int(rng.integers(100)))
        assert np.bincount(labels, minlength=k).tolist() == counts
        # every prefix holds each source's share to within one chunk
        assert _max_prefix_deviation(labels, counts) <= 1.0 + 1e-9


def test_interleave_is_deterministic_by_seed():
    counts = [7, 7, 7]
    a = interleave(counts, seed=3)
    assert np.array_equal(a, interleave(counts, seed=3))
    orders = {tuple(interleave(counts, seed=s).tolist()) for s in range(10)}
    assert len(orders) > 1  # ties are broken by the seed
    assert interleave([0, 5], seed=0).tolist() == [1] * 5


def test_online_interleaver_matches_offline_schedule():
    counts = [30, 10, 5]
    offline = interleave(counts, seed=4).tolist()
    online = OnlineInterleaver([6.0, 2.0, 1.0], seed=4)
    assert [online.next() for _ in range(sum(counts))] == offline
    online.exclude(0)
    online.exclude(1)
    online.exclude(2)
    assert online.next() is None


# --------------------------------------------------------------------------- bos


def test_bos_to_add_follows_the_tokenizer(tok):
    from datatest_utils import BOS, bos_tokenizer

    from lrc.data.packing import bos_to_add

    llama3_like, smollm_like = bos_tokenizer(), bos_tokenizer(adds_bos=False)
    assert llama3_like("x")["input_ids"][0] == BOS  # it adds its bos itself
    assert bos_to_add(llama3_like) == BOS
    assert bos_to_add(smollm_like) is None  # a bos token it never adds
    assert bos_to_add(tok) is None  # bos == eos
    assert bos_to_add(smollm_like, True) == BOS and bos_to_add(tok, True) == EOS
    assert bos_to_add(llama3_like, False) is None
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="add_bos=true but the tokenizer has no bos_token"):
        bos_to_add(SimpleNamespace(bos_token_id=None, eos_token_id=0), True)
    with pytest.raises(ValueError, match="add_bos must be one of auto, true, false; got 'yes'"):
        bos_to_add(tok, "yes")


def test_tokenize_documents_with_bos():
    from datatest_utils import BOS, bos_tokenizer

    t = bos_tokenizer()
    # a text that renders the bos itself (Llama-3's chat template) keeps exactly one
    got = tokenize_documents(["ab", "<|begin_of_text|>c", ""], t, bos_id=BOS)
    assert got == [[BOS, 97, 98], [BOS, 99], [BOS]]
    assert tokenize_documents(["ab"], t) == [[97, 98]]
    p = pack_documents(got[:2], eos_id=EOS, seq_len=3)
    # bos a b | eos bos c : the bos starts its document's segment, the eos ends the previous one
    assert [p.chunk(i).tolist() for i in range(p.n_chunks)] == [[BOS, 97, 98], [EOS, BOS, 99]]
    assert p.chunk_segments(1).tolist() == [0, 1, 1]


# --------------------------------------------------------------------------- sources that run dry
# Shares 2:1 with the largest-deficit rule give "a b a" over and over without ties:
# t=0: deficits a 2/3, b 1/3 -> a; t=1: a 1/3, b 2/3 -> b; t=2: a 1, b 0 -> a; then it repeats.


@pytest.mark.parametrize(
    "available, total, mode, expected",
    [
        ([4, 6], None, "stop", [4, 2]),          # the scarce "a" (4 for weight 2) sets the size: 6
        ([4, 6], None, "restart", [12, 6]),      # until "b" is read once; "a" three times
        ([4, 6], None, "renormalise", [4, 6]),   # everything once
        ([4, 6], 12, "restart", [8, 4]),         # the plan of 12 by weights
        ([4, 6], 8, "renormalise", [4, 4]),      # "a" gives all 4, "b" the rest
        ([40, 60], 12, "restart", [8, 4]),       # nobody runs dry: all modes agree
        ([40, 60], 12, "renormalise", [8, 4]),
        ([40, 60], 12, "stop", [8, 4]),
    ],
)
def test_mixture_counts_when_a_source_runs_dry(available, total, mode, expected):
    assert mixture_counts(available, [2.0, 1.0], [None, None], total, mode) == expected


def test_water_fill_and_plan():
    from lrc.data.packing import planned_weighted_chunks

    # weights 1:1:2 of 20: shares 5, 5, 10; "a" has 2 -> 18 left for 1:2 -> 6, 12 -> "c" has 9 -> "b" 9
    assert mixture_counts([2, 50, 9], [1.0, 1.0, 2.0], [None] * 3, 20, "renormalise") == [2, 9, 9]
    assert planned_weighted_chunks([2, 50, 9], [1.0, 1.0, 2.0], [None] * 3, 20) == [5.0, 5.0, 10.0]
    # without a total the plan reads the most plentiful source ("b": 50 at weight 1 of 4) once
    assert planned_weighted_chunks([2, 50, 9], [1.0, 1.0, 2.0], [None] * 3) == [50.0, 50.0, 100.0]
    assert planned_weighted_chunks([2, 50], [1.0, None], [None, None]) == [2.0, None]


def test_renormalised_order_by_hand():
    from lrc.data.packing import renormalised_order

    assert renormalised_order([4, 6], [2.0, 1.0]).tolist() == [0, 1, 0, 0, 1, 0, 1, 1, 1, 1]
    # three sources 1:1:1, "a" has 1, "b" 2: after "a" ends, b and c alternate 1:1, then c alone
    order = renormalised_order([1, 2, 5], [1.0, 1.0, 1.0], seed=0).tolist()
    assert sorted(order[:3]) == [0, 1, 2] and order[3:5] in ([1, 2], [2, 1]) and order[5:] == [2, 2, 2]
