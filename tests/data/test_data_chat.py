"""Chat data for SFT: assistant-only labels, packing with segment ids, both row formats, resume."""

from __future__ import annotations

import json
import re

import pytest
from datatest_utils import collect, write_jsonl

from lrc.data.chat import IGNORE, pack_conversations, render_with_labels
from lrc.data.chat_datamodule import ChatDataModule
from lrc.data.sources import SHAREGPT, SourceConfig, normalize_messages

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Green, like grass."}],
    [{"role": "user", "content": "Count to three."},
     {"role": "assistant", "content": "One, two, three."},
     {"role": "user", "content": "Thanks!"}],  # a last user turn is never trained on
]
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def as_sharegpt(messages: list[dict]) -> list[dict]:
    return [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]


def expected_labels(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token-level, independent of the code under test: each assistant turn starts where the
    template's tokenized prefix with a generation prompt ends; its content's own tokens follow, then
    the end-of-turn token <|im_end|>. Those positions carry labels, nothing else."""
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True)["input_ids"])
        content = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
        assert ids[start : start + len(content)] == content  # the content is where the prefix says
        assert ids[start + len(content)] == end_of_turn
        for t in range(start, start + len(content) + 1):
            labels[t] = ids[t]
    return ids, labels


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from lrc.teachers import SMOLLM2_NAME, default_cache_dir, load_teacher

    path = default_cache_dir() / "teachers" / SMOLLM2_NAME
    if not (path / "tokenizer.json").is_file():
        load_teacher(SMOLLM2_NAME)  # converts the embedded teacher into the cache once
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def any_tok(request):
    from lrc.teachers import tiny_tokenizer

    return tiny_tokenizer() if request.param == "tiny" else _smollm2_tokenizer()


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_exactly_the_assistant_turns_carry_labels(any_tok, fmt):
    src = (SourceConfig(name="s", kind="jsonl", messages_field="conversations", **SHAREGPT) if fmt == "sharegpt"
           else SourceConfig(name="m", kind="jsonl", messages_field="messages"))
    for conv in CONVERSATIONS:
        raw = as_sharegpt(conv) if fmt == "sharegpt" else conv
        messages = normalize_messages(raw, src)
        ids, labels = render_with_labels(messages, any_tok)
        want_ids, want_labels = expected_labels(conv, any_tok)
        assert ids == want_ids
        assert labels == want_labels
        assert sum(x != IGNORE for x in labels) > 0


def test_smollm2_labels_span_content_and_end_of_turn_only():
    """On the tiny ChatML tokenizer the labelled text is exactly each answer + <|im_end|>."""
    from lrc.teachers import tiny_tokenizer

    tok = tiny_tokenizer()
    ids, labels = render_with_labels(CONVERSATIONS[1], tok)
    assert tok.decode([i for i, x in zip(ids, labels) if x != IGNORE]) == "Blue.<|im_end|>Green, like grass.<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused():
    from lrc.teachers import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ':' + m['content'] + (messages|length|string) }}{% endfor %}"
    with pytest.raises(ValueError, match="does not render this conversation prefix by prefix"):
        render_with_labels(CONVERSATIONS[0], tok)


def test_packing_places_conversations_in_order_with_segments_and_padding():
    a = ([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])
    b = ([5, 6, 7], [IGNORE, 6, 7])
    c = ([8, 9, 10, 11, 12, 13, 14, 15], [IGNORE, 9, 10, 11, 12, 13, 14, 15])  # longer than a row
    none = ([16, 17], [IGNORE, IGNORE])  # no assistant token: left out
    rows = pack_conversations([a, b, none, c], seq_len=8, pad_id=0)
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0], [8, 9, 10, 11, 12, 13, 14, 15]]
    assert rows.labels.tolist() == [[IGNORE, IGNORE, 3, 4, IGNORE, 6, 7, IGNORE], c[1]]
    assert rows.segment_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2], [0] * 8]
    assert rows.attention_mask.tolist() == [[1] * 7 + [0], [1] * 8]
    assert (rows.conversations, rows.truncated, rows.dropped) == (3, 0, 1)
    cut = pack_conversations([c], seq_len=6, pad_id=0, packing=False)
    assert cut.input_ids.tolist() == [c[0][:6]] and cut.truncated == 1
    single = pack_conversations([a, b], seq_len=8, pad_id=0, packing=False)
    assert single.input_ids.tolist() == [[1, 2, 3, 4, 0, 0, 0, 0], [5, 6, 7, 0, 0, 0, 0, 0]]
    assert single.segment_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]


def _chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(n)]


def test_datamodule_reads_both_formats_and_labels_match(tmp_path, tok):
    m = write_jsonl(tmp_path / "m.jsonl", _chat_rows(12))
    s = write_jsonl(tmp_path / "s.jsonl", [{"conversations": as_sharegpt(r["messages"])} for r in _chat_rows(12)])
    dm = ChatDataModule([{"name": "m", "kind": "jsonl", "path": str(m)},
                         {"name": "s", "kind": "jsonl", "path": str(s), "messages_field": "conversations", **SHAREGPT}],
                        tokenizer=tok, seq_len=96, batch_size=2, shuffle=False, val_fraction=0.25)
    dm.check_data()
    # each source holds out its last 3 conversations; about 41 tokens each, two fit a row of 96
    assert dm.stats["m"] == dm.stats["s"] == {"train_conversations": 9, "train_rows": 5, "truncated": 0, "dropped": 0,
                                              "val_conversations": 3, "val_rows": 2}
    batches = collect(dm.train_dataloader())
    assert len(batches) == 5 and {k for k in batches[0]} == {"input_ids", "labels", "attention_mask", "segment_ids",
                                                             "source_ids"}
    seen = 0
    for b in batches:
        for ids, labels, seg, mask in zip(b["input_ids"], b["labels"], b["segment_ids"], b["attention_mask"]):
            for k in sorted(set(seg)):
                pos = [t for t, g in enumerate(seg) if g == k and mask[t]]
                if not pos:  # the padding's segment
                    continue
                i = int(re.search(r"Question (\d+)\?", tok.decode([ids[t] for t in pos])).group(1))
                want_ids, want = expected_labels(_chat_rows(i + 1)[i]["messages"], tok)
                assert [ids[t] for t in pos] == want_ids and [labels[t] for t in pos] == want
                seen += 1
    assert seen == 18  # every training conversation of both sources, once


def test_resume_mid_epoch_gives_the_remaining_batches(tmp_path, tok):
    path = write_jsonl(tmp_path / "m.jsonl", _chat_rows(40))
    src = [{"name": "m", "kind": "jsonl", "path": str(path)}]

    def make():
        return ChatDataModule(src, tokenizer=tok, seq_len=48, batch_size=2, seed=3)

    ref = collect(make().train_dataloader())
    first = make()
    loader = first.train_dataloader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert (state["epoch"], state["sequences_consumed"]) == (0, 3 * 2)
    resumed = make()
    resumed.load_state_dict(state)
    assert collect(resumed.train_dataloader()) == ref[3:]
    assert len(ref) >= 5


def test_chatterbot_default_is_real_dialogue(tok):
    dm = ChatDataModule([{"name": "chatterbot", "kind": "chatterbot"}], tokenizer=tok, seq_len=256, batch_size=4)
    dm.check_data()
    stats = dm.stats["chatterbot"]
    assert stats["train_conversations"] > 1500 and stats["val_conversations"] > 50
    batch = next(iter(dm.train_dataloader()))
    assert (batch["labels"] != IGNORE).sum() > 0


def test_no_validation_is_refused_and_a_module_built_from_a_path_loads_the_tokenizer(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", _chat_rows(8))
    tok.save_pretrained(tmp_path / "tok")
    dm = ChatDataModule([{"name": "c", "kind": "jsonl", "path": str(path)}], tokenizer=tmp_path / "tok", seq_len=64,
                        batch_size=2, val_fraction=0.0)
    assert dm.tokenizer.chat_template == tok.chat_template and dm.source_names == ["c"]
    with pytest.raises(ValueError) as err:
        dm.check_data()
    assert str(err.value) == ("no validation conversations: the sources hold out none (val_fraction=0.0, "
                              "val_sequences=None); raise val_fraction, add conversations or set a val_split")
    dm.check_data(require_validation=False)
    assert dm.val_dataloader() == [] and len(dm.train_dataloader()) == 4  # 8 rows of one conversation, 2 per batch


def test_bad_input_is_named(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_chat_rows(1)[0]) + "\n" + json.dumps({"messages": [{"speaker": "x"}]}) + "\n")
    dm = ChatDataModule([{"name": "b", "kind": "jsonl", "path": str(path)}], tokenizer=tok, seq_len=64, batch_size=1)
    with pytest.raises(ValueError, match=r"data source 'b': .*bad.jsonl, line 2: message 1 of messages_field 'messages'"):
        dm.check_data()
    from lrc.teachers import tiny_tokenizer

    no_template = tiny_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="the tokenizer has no chat_template"):
        ChatDataModule([{"name": "b", "kind": "chatterbot"}], tokenizer=no_template)
    with pytest.raises(ValueError, match="kind must be one of"):
        ChatDataModule([{"name": "t", "kind": "text", "path": str(path)}])
    with pytest.raises(ValueError, match="weight is not supported"):
        ChatDataModule([{"name": "c", "kind": "chatterbot", "weight": 2.0}])
