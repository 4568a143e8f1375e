"""TokenMixDataModule: packing through the module, mixing, validation split, resume, errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from datatest_utils import EOS, byte_ids, collect, run_twice_at_once, write_jsonl

from lrc.data.datamodule import TokenMixDataModule


def docs(prefix: str, n: int, length: int = 23) -> list[dict]:
    """``n`` documents with unique, recognisable text of ~``length`` bytes."""
    return [{"text": f"<{prefix}{i:04d}>" + ("abcdefghij" * 10)[: max(0, length - 7)]} for i in range(n)]


def make_dm(tmp_path, tok, sources, **kw) -> TokenMixDataModule:
    kw.setdefault("seq_len", 16)
    kw.setdefault("batch_size", 4)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    dm = TokenMixDataModule(sources, tokenizer=tok, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def decode_all(batches, key="input_ids"):
    return [row for b in batches for row in b[key]]


# --------------------------------------------------------------------------- packing, by hand


def test_exact_chunks_through_the_module(tmp_path, tok):
    texts = ["hello", "abc", "xy", "0123456", "last one!"]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    dm = make_dm(tmp_path, tok, [{"name": "a", "kind": "jsonl", "path": str(path)}],
                 seq_len=4, batch_size=1, shuffle=False, val_fraction=0.25, document_mask=True, drop_last=False)
    # validation = last documents holding >= 25% of the 31 tokens (7.75): "last one!"+eos = 10 tokens
    stream = []
    for t in texts[:-1]:
        stream += byte_ids(t) + [EOS]
    expected = [stream[i : i + 4] for i in range(0, len(stream) - 3, 4)]  # 21 tokens -> 5 chunks
    got = decode_all(collect(dm.train_dataloader()))
    assert got == expected and len(got) == 5
    val = decode_all(collect(dm.val_dataloader()))
    vstream = byte_ids("last one!") + [EOS]
    assert val == [vstream[0:4], vstream[4:8]]
    # segment ids of chunk 1 = "o", eos, "a", "b": the eos ends "hello", "abc" starts at position 2
    seg = decode_all(collect(dm.train_dataloader()), "segment_ids")
    assert seg[1] == [0, 0, 1, 1]
    assert dm.tokens_per_source == {"a": 20} and dm.val_tokens_per_source == {"a": 8}


def test_batch_format(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", docs("a", 40))
    dm = make_dm(tmp_path, tok, [{"name": "a", "kind": "jsonl", "path": str(path)}], document_mask=True)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "source_ids", "segment_ids"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, 16)
    assert batch["segment_ids"].shape == (4, 16) and batch["source_ids"].shape == (4,)
    # segment ids increase by one right after every eos, and never otherwise
    for ids, seg in zip(batch["input_ids"].tolist(), batch["segment_ids"].tolist()):
        for t in range(1, 16):
            assert seg[t] - seg[t - 1] == (1 if ids[t - 1] == EOS else 0)
    dm2 = make_dm(tmp_path, tok, [{"name": "a", "kind": "jsonl", "path": str(path)}])
    assert set(next(iter(dm2.train_dataloader()))) == {"input_ids", "source_ids"}


def test_cache_is_reused(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", docs("a", 30))
    src = [{"name": "a", "kind": "jsonl", "path": str(path)}]
    first = collect(make_dm(tmp_path, tok, src).train_dataloader())
    import lrc.data.cache as cache

    monkeypatch.setattr(cache, "iter_documents", lambda *a, **k: pytest.fail("re-read a cached source"))
    assert collect(make_dm(tmp_path, tok, src).train_dataloader()) == first
    packed = list((tmp_path / "cache" / "packed").iterdir())
    assert len(packed) == 1 and (packed[0] / "meta.json").is_file()


def test_concurrent_packing_of_one_source_tokenizes_once(tmp_path, tok, monkeypatch):
    """Two data modules packing the same source into one cache at once: one tokenizes, the other
    waits for its file lock and memory-maps the result."""
    import lrc.data.cache as cache

    path = write_jsonl(tmp_path / "a.jsonl", docs("a", 30))
    src = [{"name": "a", "kind": "jsonl", "path": str(path)}]
    (a, b), calls = run_twice_at_once(
        cache, "tokenized_docs", monkeypatch, lambda: collect(make_dm(tmp_path, tok, src).train_dataloader()))
    assert a == b and len(calls) == 1  # one source, no dedicated split: one tokenizing pass
    assert len(list((tmp_path / "cache" / "packed").iterdir())) == 1


# --------------------------------------------------------------------------- validation split


def test_validation_is_disjoint_from_training(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", docs("a", 60))
    b = write_jsonl(tmp_path / "b.jsonl", docs("b", 60))
    dm = make_dm(tmp_path, tok, [{"name": "a", "kind": "jsonl", "path": str(a)},
                                 {"name": "b", "kind": "jsonl", "path": str(b)}], val_fraction=0.1)

    def markers(rows):
        return {m for r in rows for m in re.findall(r"<([ab]\d{4})>", tok.decode(r))}

    train = markers(decode_all(collect(dm.train_dataloader())))
    val = markers(decode_all(collect(dm.val_dataloader())))
    assert len(val) >= 6 and len(train) >= 60 and not train & val
    # the held-out documents are the last ones of each source (6 of 60 = 10%)
    assert val <= {f"{p}{i:04d}" for p in "ab" for i in range(54, 60)}
    assert set(dm.val_tokens_per_source) == {"a", "b"} and all(v > 0 for v in dm.val_tokens_per_source.values())


def test_val_sequences_cap_keeps_proportions(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", docs("a", 200))
    b = write_jsonl(tmp_path / "b.jsonl", docs("b", 100))
    dm = make_dm(tmp_path, tok, [{"name": "a", "kind": "jsonl", "path": str(a)},
                                 {"name": "b", "kind": "jsonl", "path": str(b)}],
                 val_fraction=0.2, val_sequences=9)
    sizes = dm.val_dataset.sizes
    assert sizes[0] > sizes[1] > 0
    ids = [s for bt in collect(dm.val_dataloader()) for s in bt["source_ids"]]
    assert len(ids) == 9
    assert abs(ids.count(0) - 9 * sizes[0] / sum(sizes)) <= 1


# --------------------------------------------------------------------------- mixing


def test_mixture_proportions_follow_weights(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", docs("a", 300))
    b = write_jsonl(tmp_path / "b.jsonl", docs("b", 300))
    dm = make_dm(tmp_path, tok, [{"name": "a", "kind": "jsonl", "path": str(a), "weight": 3.0},
                                 {"name": "b", "kind": "jsonl", "path": str(b), "weight": 1.0}],
                 batch_size=8)
    ta, tb = dm.tokens_per_source["a"], dm.tokens_per_source["b"]
    assert ta == dm.available_chunks[0] * 16  # "a" is the scarce one relative to its weight
    assert abs(ta / 16 - 3 * tb / 16) <= 3  # 3:1 to within one chunk per unit of weight
    ids = [s for bt in collect(dm.train_dataloader()) for s in bt["source_ids"]]
    assert len(ids) == (ta + tb) // 16 // 8 * 8  # whole batches of the planned mixture
    # every prefix of the epoch is within one chunk of 3:1
    counts = np.cumsum(np.array(ids) == 0)
    t = np.arange(1, len(ids) + 1)
    share = ta / (ta + tb)
    assert np.abs(counts - share * t).max() <= 1.0 + 1e-9


def test_budgets_and_max_train_tokens(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", docs("a", 100))
    b = write_jsonl(tmp_path / "b.jsonl", docs("b", 100))
    dm = make_dm(tmp_path, tok, [{"name": "a", "kind": "jsonl", "path": str(a), "max_tokens": 160},
                                 {"name": "b", "kind": "jsonl", "path": str(b)}])
    assert dm.tokens_per_source["a"] == 160  # 10 chunks of 16
    assert dm.tokens_per_source["b"] == dm.available_chunks[1] * 16  # no weight, no budget: all
    capped = make_dm(tmp_path, tok, [{"name": "a", "kind": "jsonl", "path": str(a), "weight": 1.0},
                                     {"name": "b", "kind": "jsonl", "path": str(b), "weight": 1.0}],
                     max_train_tokens=16 * 20)
    assert capped.tokens_per_source == {"a": 160, "b": 160}
    assert len(capped.train_dataloader()) == 5


def test_shuffle_is_deterministic_and_epoch_dependent(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", docs("a", 120))
    src = [{"name": "a", "kind": "jsonl", "path": str(a)}]
    dm1, dm2 = (make_dm(tmp_path, tok, src, seed=5, drop_last=False) for _ in range(2))
    e0 = collect(dm1.train_dataloader())
    assert e0 == collect(dm2.train_dataloader())
    dm1.set_epoch(1)
    e1 = collect(dm1.train_dataloader())
    assert e1 != e0 and sorted(map(str, decode_all(e1))) == sorted(map(str, decode_all(e0)))
    other = collect(make_dm(tmp_path, tok, src, seed=6, drop_last=False).train_dataloader())
    assert other != e0
    unshuffled = decode_all(collect(make_dm(tmp_path, tok, src, shuffle=False).train_dataloader()))
    packed = make_dm(tmp_path, tok, src, shuffle=False).train_dataset.streams[0]
    assert unshuffled == [packed.chunk(i).tolist() for i in range(len(unshuffled))]


# --------------------------------------------------------------------------- exact resume


def _two_sources(tmp_path, streaming=False):
    a = write_jsonl(tmp_path / "a.jsonl", docs("a", 150, 31))
    b = write_jsonl(tmp_path / "b.jsonl", docs("b", 90, 19))
    return [{"name": "a", "kind": "jsonl", "path": str(a), "weight": 2.0, "streaming": streaming},
            {"name": "b", "kind": "jsonl", "path": str(b), "weight": 1.0, "streaming": streaming}]


@pytest.mark.parametrize("streaming", [False, True])
def test_mid_epoch_resume_is_exact(tmp_path, tok, streaming):
    sources = _two_sources(tmp_path, streaming)
    kw = dict(seed=3, document_mask=True, shuffle_buffer=16)
    # uninterrupted: all of epoch 0, then epoch 1
    ref = make_dm(tmp_path, tok, sources, **kw)
    loader = ref.train_dataloader()
    epoch0 = collect(loader)
    ref.set_epoch(1)
    epoch1 = collect(loader)
    assert len(epoch0) >= 8 and epoch0 != epoch1

    # interrupted after 5 batches
    run = make_dm(tmp_path, tok, sources, **kw)
    first = collect(run.train_dataloader(), 5)
    assert first == epoch0[:5]
    state = run.state_dict()
    assert state["epoch"] == 0 and state["sequences_consumed"] == 5 * 4 and state["version"] == 2

    resumed = make_dm(tmp_path, tok, sources, **kw)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    assert collect(loader) == epoch0[5:]
    assert resumed.state_dict()["sequences_consumed"] == len(epoch0) * 4
    resumed.set_epoch(1)
    assert collect(loader) == epoch1  # the next epoch starts from its beginning

    # state loaded before setup (Lightning restores after setup, manual users may not)
    early = TokenMixDataModule(sources, tokenizer=tok, seq_len=16, batch_size=4,
                               cache_dir=str(tmp_path / "cache"), **kw)
    early.load_state_dict(state)
    assert collect(early.train_dataloader(), 2) == epoch0[5:7]


def _on_ranks(dm, rank, world, accumulate=1):
    """``dm`` as seen by process ``rank`` of ``world`` accumulating ``accumulate`` batches a step
    (what an attached Trainer tells it)."""
    from types import SimpleNamespace

    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, accumulate_grad_batches=accumulate)
    return dm


@pytest.mark.parametrize("streaming", [False, True])
def test_epochs_are_whole_optimizer_steps(tmp_path, tok, streaming):
    """Every optimizer step holds ``world x accumulate`` full batches, so its gradient (each
    micro-batch's mean divided by the accumulation, averaged over processes) is the token-weighted
    mean of the global batch: the epoch drops the tail that does not fill a step, on 1 process
    accumulating 4 and on 2 accumulating 2 alike (same global batch, same sequences), every rank
    gets as many batches, and drop_last=false is refused once a step has several micro-batches."""
    sources = _two_sources(tmp_path, streaming)
    kw = dict(seed=4, shuffle_buffer=16, batch_size=2, max_train_tokens=44 * 16)  # 22 batches of 2
    plain = collect(make_dm(tmp_path, tok, sources, **kw).train_dataloader())
    whole = 20  # 5 steps of 4 batches
    assert len(plain) == 22
    one = collect(_on_ranks(make_dm(tmp_path, tok, sources, **kw), 0, 1, 4).train_dataloader())
    assert one == plain[:whole]
    r0, r1 = (collect(_on_ranks(make_dm(tmp_path, tok, sources, **kw), r, 2, 2).train_dataloader()) for r in (0, 1))
    assert len(r0) == len(r1) == whole // 2 and r0 == plain[:whole:2] and r1 == plain[1:whole:2]
    with pytest.raises(ValueError, match=r"drop_last=false .* step of 2 micro-batches \(1 process\(es\) x 2"):
        _on_ranks(make_dm(tmp_path, tok, sources, drop_last=False, **kw), 0, 1, 2).train_dataloader()


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_position_is_global_across_process_counts(tmp_path, tok, streaming):
    """The stored position counts the sequences of every process together, so a position written on
    1 process resumes on 2 (each skips its half) and one written on 2 resumes on 1; a position that is
    not a whole batch of every process is refused; a version-1 state still counts one process's batches."""
    sources = _two_sources(tmp_path, streaming)
    kw = dict(seed=5, shuffle_buffer=16, batch_size=2)
    ref = collect(make_dm(tmp_path, tok, sources, **kw).train_dataloader())  # 1 process, batches of 2
    assert len(ref) >= 16

    def ranks(state, world=2):
        out = []
        for r in range(world):
            dm = _on_ranks(make_dm(tmp_path, tok, sources, **kw), r, world)
            dm.load_state_dict(state)
            out.append(collect(dm.train_dataloader()))
        return out

    one = make_dm(tmp_path, tok, sources, **kw)
    collect(one.train_dataloader(), 6)
    state = one.state_dict()
    assert state["sequences_consumed"] == 12 and state["version"] == 2
    r0, r1 = ranks(state)  # 1 -> 2 processes: rank r takes global batches 6 + r, 8 + r, ...
    assert r0[:4] == ref[6::2][:4] and r1[:4] == ref[7::2][:4]

    two = _on_ranks(make_dm(tmp_path, tok, sources, **kw), 0, 2)
    collect(two.train_dataloader(), 3)  # 3 batches on each of 2 processes: 12 sequences
    assert two.state_dict()["sequences_consumed"] == 12
    back = make_dm(tmp_path, tok, sources, **kw)  # 2 -> 1 process
    back.load_state_dict(two.state_dict())
    assert collect(back.train_dataloader()) == ref[6:]

    odd = make_dm(tmp_path, tok, sources, **kw)
    collect(odd.train_dataloader(), 3)  # 6 sequences: not whole batches of 2 processes x 2
    with pytest.raises(ValueError, match=r"stopped 6 sequences into epoch 0.*batch_size=2 on 2 process\(es\)"):
        ranks(odd.state_dict())
    r0, r1 = ranks({"version": 1, "epoch": 0, "batches_consumed": 3, "fingerprint": None, "seed": 5})
    assert r0[:2] == ref[6::2][:2] and r1[:2] == ref[7::2][:2]


def test_resume_in_a_later_epoch(tmp_path, tok):
    sources = _two_sources(tmp_path)
    ref = make_dm(tmp_path, tok, sources, seed=1)
    ref.set_epoch(2)
    epoch2 = collect(ref.train_dataloader())
    resumed = make_dm(tmp_path, tok, sources, seed=1)
    resumed.load_state_dict({"version": 1, "epoch": 2, "batches_consumed": 3, "fingerprint": None, "seed": 1})
    assert collect(resumed.train_dataloader()) == epoch2[3:]


def test_streaming_with_workers_keeps_the_order(tmp_path, tok):
    sources = _two_sources(tmp_path, streaming=True)
    ref = collect(make_dm(tmp_path, tok, sources, seed=2).train_dataloader())
    dm = make_dm(tmp_path, tok, sources, seed=2, num_workers=2)
    assert collect(dm.train_dataloader()) == ref
    dm.load_state_dict({"version": 1, "epoch": 0, "batches_consumed": 3, "fingerprint": None, "seed": 2})
    assert collect(dm.train_dataloader()) == ref[3:]


def test_streaming_matches_weights_and_holds_out_the_stream_head(tmp_path, tok):
    sources = _two_sources(tmp_path, streaming=True)
    dm = make_dm(tmp_path, tok, sources, seed=0, val_tokens=64, shuffle=False)
    ids = [s for bt in collect(dm.train_dataloader()) for s in bt["source_ids"]]
    t = np.arange(1, len(ids) + 1)
    assert np.abs(np.cumsum(np.array(ids) == 0) - t * 2 / 3).max() <= 1.0 + 1e-9
    assert dm.tokens_per_source == {"a": None, "b": None}
    # validation = first documents of each stream (>= 64 tokens), never trained on
    val_text = tok.decode([x for r in decode_all(collect(dm.val_dataloader())) for x in r])
    train_text = tok.decode([x for r in decode_all(collect(dm.train_dataloader())) for x in r])
    assert "<a0000>" in val_text and "<b0000>" in val_text
    assert "<a0000>" not in train_text and "<b0000>" not in train_text


@pytest.mark.parametrize(
    "streaming, mode, checked",
    [(False, "stop", False), (True, "stop", False), (True, "restart", True), (False, "renormalise", True)],
)
def test_lightning_checkpoint_resume_is_exact(tmp_path, tok, streaming, mode, checked):
    """Through a real Trainer: checkpoint mid-epoch, resume from it, same batches as one run (also when
    the data was checked before the trainer existed, as lrc-distill does, and when "b" runs dry)."""
    import lightning as L

    sources = _two_sources(tmp_path, streaming)

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[list[int]]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"].tolist())
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer(max_steps, ckpt_every=None):
        cbs = []
        if ckpt_every:
            cbs.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=ckpt_every,
                                                           save_top_k=-1, filename="{step}"))
        return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(ckpt_every), callbacks=cbs,
                         limit_val_batches=0, num_sanity_val_steps=0)

    def fresh_dm():
        dm = TokenMixDataModule(sources, tokenizer=tok, seq_len=16, batch_size=4, seed=7,
                                cache_dir=str(tmp_path / "cache"), on_exhausted=mode)
        if checked:
            dm.check_data()
        return dm

    full_dm = fresh_dm()
    full_dm.setup("fit")
    per_epoch = len(collect(full_dm.train_dataloader()))
    total = per_epoch + 3  # crosses an epoch boundary
    full = Recorder()
    trainer(total).fit(full, datamodule=fresh_dm())
    assert len(full.seen) == total

    first = Recorder()
    trainer(5, ckpt_every=5).fit(first, datamodule=fresh_dm())
    ckpt = tmp_path / "ckpt" / "step=5.ckpt"
    saved = torch.load(ckpt, weights_only=False)["TokenMixDataModule"]
    assert saved["epoch"] == 0 and saved["sequences_consumed"] == 5 * 4

    second = Recorder()
    trainer(total).fit(second, datamodule=fresh_dm(), ckpt_path=ckpt)
    assert first.seen + second.seen == full.seen


def test_sampler_shards_whole_batches_by_rank():
    from torch.utils.data import DistributedSampler

    from lrc.data.in_memory import MixtureSampler

    full = MixtureSampler([30, 20], [30, 10], batch_size=4, seed=1)
    assert isinstance(full, DistributedSampler)  # so Lightning does not wrap it again
    glob = [b.tolist() for b in full.rank_batches(0)]
    assert len(glob) == 10 and len(full) == 40 and len(list(full)) == 40
    ranks = [MixtureSampler([30, 20], [30, 10], batch_size=4, seed=1, rank=r, world_size=3) for r in range(3)]
    # 10 global batches // 3 ranks = 3 each; rank r takes global batches r, r + 3, r + 6
    for r, sampler in enumerate(ranks):
        assert [b.tolist() for b in sampler.rank_batches(0)] == [glob[r], glob[r + 3], glob[r + 6]]
        assert len(sampler) == 12 and list(sampler) == [i for g in (r, r + 3, r + 6) for i in glob[g]]
    ragged = MixtureSampler([40], [40], batch_size=6, seed=0, drop_last=False)
    assert len(ragged) == 40 and len(ragged.rank_batches(0)[-1]) == 4
    ragged.set_resume(0, 5)
    assert list(ragged) == ragged.epoch_order(0)[30:].tolist()


# --------------------------------------------------------------------------- errors


def test_errors(tmp_path, tok):
    path = str(write_jsonl(tmp_path / "a.jsonl", docs("a", 3)))
    ok = [{"name": "a", "kind": "jsonl", "path": path}]
    with pytest.raises(ValueError, match=r"seq_len=4096 exceeds .* max_seq_len=2048"):
        TokenMixDataModule(ok, tokenizer=tok, seq_len=4096, max_seq_len=2048)
    with pytest.raises(ValueError, match="no training sequences of seq_len=512"):
        make_dm(tmp_path, tok, ok, seq_len=512)
    with pytest.raises(ValueError, match="no full training batch"):
        make_dm(tmp_path, tok, ok, seq_len=16, batch_size=64)
    with pytest.raises(ValueError, match="no tokenizer"):
        TokenMixDataModule(ok, seq_len=16).setup("fit")
    with pytest.raises(ValueError, match=r"names must be unique; repeated: \['a'\]"):
        TokenMixDataModule(ok + ok, tokenizer=tok)
    with pytest.raises(ValueError, match="at least one data source"):
        TokenMixDataModule([], tokenizer=tok)
    with pytest.raises(FileNotFoundError, match=r"'b' \(jsonl\): file not found"):  # at construction time
        TokenMixDataModule(ok + [{"name": "b", "kind": "jsonl", "path": str(tmp_path / "b.jsonl")}])
    streaming = [dict(ok[0], streaming=True, weight=1.0), {"name": "b", "kind": "jsonl", "path": path,
                                                           "streaming": True}]
    with pytest.raises(ValueError, match="streaming mixture needs 'weight' on every source"):
        TokenMixDataModule(streaming, tokenizer=tok)
    with pytest.raises(ValueError, match="unsupported TokenMixDataModule state version"):
        make_dm(tmp_path, tok, ok, seq_len=8, batch_size=1).load_state_dict({"version": 99})


def test_set_tokenizer_checks_chat_sources(tmp_path, tok):
    from types import SimpleNamespace

    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    dm = TokenMixDataModule([{"name": "chat", "kind": "jsonl", "path": str(path), "messages_field": "messages"}],
                            seq_len=11, batch_size=1, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="'chat': messages_field is set but the tokenizer has no chat_template"):
        dm.set_tokenizer(SimpleNamespace(eos_token_id=0, chat_template=None))
    with pytest.raises(ValueError, match="no eos_token_id"):
        dm.set_tokenizer(SimpleNamespace(eos_token_id=None, chat_template="x"))
    dm.set_tokenizer(tok)
    assert dm.tokenizer is tok
    dm.setup("fit")
    rows = [r for b in collect(dm.train_dataloader()) for r in b["input_ids"]]
    # one rendered conversation + eos is exactly 11 tokens: every chunk is one document
    expected = [257] + byte_ids("user\nhi") + [258] + byte_ids("\n") + [EOS]
    assert len(rows) == 3 and all(r == expected for r in rows)  # 4 docs, the last one held out


# --------------------------------------------------------------------------- a weighted source that runs dry
# Every document is exactly one sequence (7 bytes + eos = seq_len 8), named by its source and
# index. Weights 2:1 mix as "a b a" over and over (no ties, see test_data_packing.py). "a" has
# 5 documents, "b" 7; one of each is held out for validation (in memory: the last one, streaming:
# the first one), so training sees a0..a3 / b0..b5 in memory and a1..a4 / b1..b6 when streaming.
# "a" (4 sequences for weight 2) runs dry long before "b" (6 for weight 1).

A_B_A = "aba" * 10


def _dry_sources(tmp_path, streaming):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}".ljust(7, ".")} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}".ljust(7, ".")} for i in range(7)])
    return [{"name": "a", "kind": "jsonl", "path": str(a), "weight": 2.0, "streaming": streaming},
            {"name": "b", "kind": "jsonl", "path": str(b), "weight": 1.0, "streaming": streaming}]


def _names(tok, batches):
    return [tok.decode(row[:2]) for row in decode_all(batches)]


def _expected(pattern: str, passes: dict[str, list[int]]) -> list[str]:
    """Document names for a pattern of source letters, each source cycling through its documents."""
    seen = {"a": 0, "b": 0}
    out = []
    for s in pattern:
        out.append(f"{s}{passes[s][seen[s] % len(passes[s])]}")
        seen[s] += 1
    return out


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
@pytest.mark.parametrize(
    "mode, total, pattern",
    [
        ("stop", None, A_B_A[:6]),                     # "a" runs dry at its 5th turn: the epoch ends
        ("restart", None, A_B_A[:18]),                 # "a" read 3 times, until "b" has been read once
        ("renormalise", None, A_B_A[:6] + "bbbb"),     # then "b" alone
        ("restart", 12, A_B_A[:12]),                   # max_train_tokens = 12 sequences
        ("renormalise", 8, A_B_A[:6] + "bb"),          # max_train_tokens = 8 sequences
    ],
)
def test_a_source_that_runs_dry(tmp_path, tok, caplog, streaming, mode, total, pattern):
    dm = make_dm(tmp_path, tok, _dry_sources(tmp_path, streaming), seq_len=8, batch_size=1, shuffle=False,
                 val_tokens=8, on_exhausted=mode, max_train_tokens=None if total is None else 8 * total)
    docs = {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4, 5, 6]} if streaming else {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3, 4, 5]}
    with caplog.at_level("WARNING", logger="lrc.data.streaming" if streaming else "lrc.data.in_memory"):
        got = _names(tok, collect(dm.train_dataloader()))
    assert got == _expected(pattern, docs)
    # the log names the source, where it ran dry and its tokens against its planned share
    dry = [r.getMessage() for r in caplog.records if "data source 'a'" in r.getMessage()]
    assert len(dry) == 1 and "'b'" not in dry[0]
    plan = {None: None if streaming else 96, 12: 64, 8: 43}[total]  # 2/3 of the planned sequences x 8
    if streaming:
        assert "ran dry in epoch 0 after 32 tokens (4 sequences of 8), at sequence 6 (batch 6)" in dry[0]
        assert (f"its planned share is {plan} tokens" if plan else "no planned share (max_train_tokens is not set)") in dry[0]
    else:
        assert f"runs dry: it holds 32 tokens (4 sequences of 8) but its planned share is {plan} tokens" in dry[0]
        assert "after 6 sequences (6 batches) of each epoch" in dry[0]
    action = {"stop": "the epoch ends", "restart": "it is read again from its start",
              "renormalise": "the other sources go on with their weights renormalised"}[mode]
    assert action in dry[0] and f"(on_exhausted={mode})" in dry[0]


def test_no_report_when_nothing_runs_dry(tmp_path, tok, caplog):
    sources = _dry_sources(tmp_path, False)
    with caplog.at_level("WARNING", logger="lrc.data.in_memory"):
        make_dm(tmp_path, tok, sources, seq_len=8, batch_size=1, val_tokens=8, max_train_tokens=8 * 6)
    assert not [r for r in caplog.records if "runs dry" in r.getMessage()]  # 4 a + 2 b fit the plan
    with pytest.raises(ValueError, match="on_exhausted must be one of stop, restart, renormalise; got 'loop'"):
        TokenMixDataModule(sources, on_exhausted="loop")


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
@pytest.mark.parametrize("mode", ["restart", "renormalise"])
def test_mid_epoch_resume_is_exact_when_a_source_runs_dry(tmp_path, tok, streaming, mode):
    # "b" (112 sequences at weight 1) is the scarce one next to "a" (~290 at weight 2)
    sources = _two_sources(tmp_path, streaming)
    kw = dict(seed=3, shuffle_buffer=16, on_exhausted=mode)
    ref = make_dm(tmp_path, tok, sources, **kw)
    loader = ref.train_dataloader()
    epoch0 = collect(loader)
    ref.set_epoch(1)
    epoch1 = collect(loader)
    stop = collect(make_dm(tmp_path, tok, sources, seed=3, shuffle_buffer=16).train_dataloader())
    assert len(epoch0) > len(stop) and epoch0 != epoch1
    ids = [s for b in epoch0 for s in b["source_ids"]]
    # training sequences of 16: "a" 142 documents of 32 tokens, "b" 85 of 20 in memory (the last 8 / 5
    # held out: 5% of the tokens) or 77 streaming (the first 13 held out: 16 sequences' worth)
    a_train, b_train = 142 * 32 // 16, (77 if streaming else 85) * 20 // 16
    if mode == "restart":  # 2:1 to the end: "b" is read again
        assert ids.count(1) > b_train and abs(ids.count(0) - 2 * ids.count(1)) <= 2
    else:  # every sequence of both sources once, "a" alone at the end (drop_last trims < 4)
        assert ids.count(1) == b_train and a_train - 4 < ids.count(0) <= a_train
        assert set(ids[-len(ids) // 8:]) == {0}

    run = make_dm(tmp_path, tok, sources, **kw)
    assert collect(run.train_dataloader(), 7) == epoch0[:7]
    state = run.state_dict()
    resumed = make_dm(tmp_path, tok, sources, **kw)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    assert collect(loader) == epoch0[7:]
    resumed.set_epoch(1)
    assert collect(loader) == epoch1


# --------------------------------------------------------------------------- bos at document starts


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
def test_packed_stream_with_a_distinct_bos(tmp_path, streaming):
    from datatest_utils import BOS, bos_tokenizer

    texts = ["hello", "abc", "xy", "0123456", "last one!"]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    src = [{"name": "a", "kind": "jsonl", "path": str(path), "streaming": streaming}]
    kw = dict(seq_len=4, batch_size=1, shuffle=False, document_mask=True, drop_last=False)
    # in memory: the last document is held out (val_tokens=1); streaming: the first one
    train_docs, val_docs = (texts[1:], texts[:1]) if streaming else (texts[:-1], texts[-1:])
    stream = [t for d in train_docs for t in [BOS, *byte_ids(d), EOS]]
    dm = make_dm(tmp_path, bos_tokenizer(), src, val_tokens=1, **kw)
    assert dm.bos_id == BOS
    batches = collect(dm.train_dataloader())
    assert decode_all(batches) == [stream[i : i + 4] for i in range(0, len(stream) - 3, 4)]
    # segment ids: a new segment starts at every bos and nowhere else (the eos ends the previous one)
    for ids, seg in zip(decode_all(batches), decode_all(batches, "segment_ids")):
        assert all(seg[t] - seg[t - 1] == (ids[t] == BOS) for t in range(1, 4))
    # chunk 1: "l", "o", eos, bos (of "abc") in memory; eos, bos, "x", "y" streaming
    assert decode_all(batches, "segment_ids")[1] == ([0, 1, 1, 1] if streaming else [0, 0, 0, 1])
    vstream = [BOS, *byte_ids(val_docs[0]), EOS]
    assert decode_all(collect(dm.val_dataloader())) == [vstream[i : i + 4] for i in range(0, len(vstream) - 3, 4)]
    # same tokenizer without a bos of its own (or add_bos=false): no bos
    plain = make_dm(tmp_path, bos_tokenizer(adds_bos=False), src, val_tokens=1, **kw)
    off = make_dm(tmp_path, bos_tokenizer(), src, val_tokens=1, add_bos=False, **kw)
    no_bos = [t for d in train_docs for t in [*byte_ids(d), EOS]]
    for other in (plain, off):
        assert other.bos_id is None
        assert decode_all(collect(other.train_dataloader())) == [no_bos[i : i + 4] for i in range(0, len(no_bos) - 3, 4)]


def test_bos_setting_is_part_of_the_cache_key(tmp_path):
    from datatest_utils import BOS, bos_tokenizer

    path = write_jsonl(tmp_path / "a.jsonl", docs("a", 40))
    src = [{"name": "a", "kind": "jsonl", "path": str(path)}]
    t = bos_tokenizer()
    without = make_dm(tmp_path, t, src, add_bos=False, shuffle=False)
    with_bos = make_dm(tmp_path, t, src, add_bos="auto", shuffle=False)  # same cache, same tokenizer
    first = decode_all(collect(with_bos.train_dataloader(), 1))[0]
    assert first[0] == BOS and BOS not in decode_all(collect(without.train_dataloader()))[0]
    assert len(list((tmp_path / "cache" / "packed").iterdir())) == 2
    assert without._data_fingerprint() != with_bos._data_fingerprint()


# --------------------------------------------------------------------------- check_data: up front


def test_check_data_reads_once_and_training_reuses_it(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", docs("a", 40))
    dm = TokenMixDataModule([{"name": "a", "kind": "jsonl", "path": str(path)}], tokenizer=tok, seq_len=16,
                            batch_size=4, cache_dir=str(tmp_path / "cache"))
    dm.check_data()
    import lrc.data.cache as cache
    import lrc.data.datamodule as dmod

    monkeypatch.setattr(cache, "iter_documents", lambda *a, **k: pytest.fail("read the data again"))
    monkeypatch.setattr(dmod, "build_packed_source", lambda *a, **k: pytest.fail("packed again"))
    dm.prepare_data()  # what Lightning calls next
    dm.setup("fit")
    assert len(collect(dm.train_dataloader())) == dm.sampler.batches_per_epoch() > 0
    assert collect(dm.val_dataloader())


@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
@pytest.mark.parametrize(
    "texts, kw, message",
    [
        (["a"], {}, r"no training sequences of seq_len=16: the training text \('a': 2 tokens\) does not fill one "
                    r"sequence; lower seq_len or add text"),
        ([f"document {i}, long enough" for i in range(8)], dict(batch_size=64),  # 8 x 24 tokens = 12 x 16
         r"no full training batch: the data gives 12 training sequences of seq_len=16 per epoch, fewer than "
         r"batch_size=64; lower batch_size or seq_len, or add data"),
    ],
    ids=["one_token", "batch_larger_than_data"],
)
def test_check_data_too_little_training_data(tmp_path, tok, streaming, texts, kw, message):
    if streaming and texts == ["a"]:
        message = r"no full training batch: the data gives 0 training sequences"
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    dm = TokenMixDataModule([{"name": "a", "kind": "jsonl", "path": str(path), "streaming": streaming}],
                            tokenizer=tok, seq_len=16, cache_dir=str(tmp_path / "cache"),
                            **{"batch_size": 4, "val_tokens": 0, **kw})
    with pytest.raises(ValueError, match=message):
        dm.check_data(require_validation=False)


@pytest.mark.parametrize(
    "texts, kw, message",
    [
        (["word " * 200], {}, r"no validation sequences of seq_len=16: 'a' holds out 0 tokens in 0 documents "
                              r"\(carved\) \(a source of one document cannot hold one out\)\. Validation needs at least "
                              r"one full sequence: lower seq_len, raise val_fraction or val_tokens, add documents, or "
                              r"give a hub source its own held-out split \(val_split\)"),
        (["word " * 200, "short"], {}, r"'a' holds out 6 tokens in 1 documents \(carved\)\. Validation needs"),
        (["word " * 200] * 3, dict(val_sequences=0), r"no validation sequences: val_sequences=0; set it to null"),
    ],
    ids=["one_long_document", "held_out_too_short", "val_sequences_0"],
)
def test_check_data_no_validation_sequences(tmp_path, tok, texts, kw, message):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    dm = TokenMixDataModule([{"name": "a", "kind": "jsonl", "path": str(path)}], tokenizer=tok, seq_len=16,
                            batch_size=4, cache_dir=str(tmp_path / "cache"), **kw)
    with pytest.raises(ValueError, match=message):
        dm.check_data()
    dm.check_data(require_validation=False)  # training alone is fine


def test_check_data_finds_a_bad_row_101(tmp_path, tok):
    rows = docs("a", 150)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    lines = path.read_text().splitlines()
    lines[100] = '{"body": "no text"}'
    path.write_text("\n".join(lines) + "\n")
    dm = TokenMixDataModule([{"name": "a", "kind": "jsonl", "path": str(path)}], tokenizer=tok, seq_len=16,
                            batch_size=4, cache_dir=str(tmp_path / "cache"))  # the first row is fine
    with pytest.raises(ValueError, match=rf"data source 'a': {path}, line 101: text_field 'text' not found; "
                                         r"available fields: \['body'\]"):
        dm.check_data()
