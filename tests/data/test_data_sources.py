"""Sources: readers, filters, chat rendering, key mapping and every up-front validation error."""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import pytest
from datatest_utils import write_jsonl, write_parquet

from lrc.data.sources import (
    SHAREGPT,
    SourceConfig,
    apply_filters,
    iter_documents,
    override_sources,
    validate_source,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
CHAT_TEXT = (  # ChatML written out by hand
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nCapital of France?<|im_end|>\n"
    "<|im_start|>assistant\nParis.<|im_end|>\n"
)


def src(**kw) -> SourceConfig:
    kw.setdefault("name", "s")
    return SourceConfig(**kw)


# --------------------------------------------------------------------------- reading


def test_jsonl_filters_min_max_equals_in(tmp_path):
    rows = [{"text": f"doc{i}", "int_score": i % 6, "lang": "en" if i % 2 else "de"} for i in range(12)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    s = src(kind="jsonl", path=str(path), filters={"int_score": {"min": 4}})
    validate_source(s)
    assert list(iter_documents(s)) == ["doc4", "doc5", "doc10", "doc11"]
    s = src(kind="jsonl", path=str(path), filters={"int_score": {"min": 1, "max": 2}, "lang": {"equals": "en"}})
    assert list(iter_documents(s)) == ["doc1", "doc7"]
    s = src(kind="jsonl", path=str(path), filters={"int_score": {"in": [0, 5]}})
    assert list(iter_documents(s)) == ["doc0", "doc5", "doc6", "doc11"]


def test_apply_filters_null_and_missing_fail():
    assert apply_filters({"a": {"b": 3}}, {"a.b": {"min": 3}})
    assert not apply_filters({"a": {"b": None}}, {"a.b": {"min": 3}})
    assert not apply_filters({"a": {}}, {"a.b": {"min": 3}})


def test_parquet_nested_filter_and_glob_order(tmp_path):
    # Fineweb-Edu (smollm-corpus) schema: the score lives in a nested metadata struct
    for part in (1, 0):
        rows = [{"text": f"p{part}-{i}", "id": str(i), "metadata": {"int_score": i, "url": "u"}} for i in range(6)]
        write_parquet(tmp_path / f"part-{part}.parquet", rows)
    s = src(kind="parquet", path=str(tmp_path / "part-*.parquet"), filters={"metadata.int_score": {"min": 4}})
    validate_source(s)
    assert list(iter_documents(s)) == ["p0-4", "p0-5", "p1-4", "p1-5"]  # files in sorted order


def test_nested_text_field_json_array_and_gzip(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps([{"body": {"t": "one"}}, {"body": {"t": "two"}}]))
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"body": {"t": "three"}}) + "\n")
    s = src(kind="jsonl", path=[str(tmp_path / "arr.json"), str(tmp_path / "z.jsonl.gz")], text_field="body.t")
    validate_source(s)
    assert list(iter_documents(s)) == ["one", "two", "three"]


def test_text_files_sample_by(tmp_path):
    (tmp_path / "a.txt").write_text("l1\nl2\n\nl3\n\n\nl4\n")
    base = dict(kind="text", path=str(tmp_path / "a.txt"))
    assert list(iter_documents(src(**base, sample_by="document"))) == ["l1\nl2\n\nl3\n\n\nl4\n"]
    assert list(iter_documents(src(**base, sample_by="paragraph"))) == ["l1\nl2", "l3", "l4"]
    assert list(iter_documents(src(**base, sample_by="line"))) == ["l1", "l2", "l3", "l4"]


# --------------------------------------------------------------------------- chat rendering


def test_messages_rendered_with_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:]}])
    s = src(kind="jsonl", path=str(path), messages_field="messages")
    validate_source(s, tok)
    docs = list(iter_documents(s, tok))
    assert docs[0] == CHAT_TEXT
    assert docs[0] == tok.apply_chat_template(CHAT, tokenize=False)
    assert docs[1] == tok.apply_chat_template(CHAT[1:], tokenize=False)
    # rendered special tokens become single special ids when tokenized as plain text
    ids = tok(docs[1], add_special_tokens=False)["input_ids"]
    assert ids.count(257) == 2 and ids.count(258) == 2


def test_sharegpt_key_and_role_mapping(tmp_path, tok):
    # OpenHermes-2.5 schema: conversations of {"from", "value", "weight"}
    conv = [
        {"from": "system", "value": "Be brief.", "weight": None},
        {"from": "human", "value": "Capital of France?", "weight": 0.0},
        {"from": "gpt", "value": "Paris.", "weight": 1.0},
    ]
    path = write_jsonl(tmp_path / "h.jsonl", [{"conversations": conv, "source": "x"}])
    s = src(kind="jsonl", path=str(path), messages_field="conversations", **SHAREGPT)
    validate_source(s, tok)
    assert list(iter_documents(s, tok)) == [CHAT_TEXT]
    # without the mapping the first row is rejected up front
    with pytest.raises(ValueError, match=r"'s'.*'role' and 'content'"):
        validate_source(src(kind="jsonl", path=str(path), messages_field="conversations"))


def test_messages_need_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    plain = SimpleNamespace(chat_template=None, eos_token_id=256)  # a tokenizer without a template
    with pytest.raises(ValueError, match="'s'.*no chat_template"):
        validate_source(src(kind="jsonl", path=str(path), messages_field="messages"), plain)


# --------------------------------------------------------------------------- validation errors


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"data source 'web': unknown kind 'csv'"):
        validate_source(SourceConfig(name="web", kind="csv", path="x.csv"))


def test_missing_file_and_glob_without_match(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'s' \(jsonl\): file not found: .*nope\.jsonl"):
        validate_source(src(kind="jsonl", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match=r"'s' \(parquet\): no file matches .*\*\.parquet"):
        validate_source(src(kind="parquet", path=str(tmp_path / "*.parquet")))
    write_jsonl(tmp_path / "ok.jsonl", [{"text": "x"}])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):  # one bad entry in a list is enough
        validate_source(src(kind="jsonl", path=[str(tmp_path / "ok.jsonl"), str(tmp_path / "missing.jsonl")]))


def test_empty_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"'s' \(jsonl\): file .*e\.jsonl' is empty"):
        validate_source(src(kind="jsonl", path=str(tmp_path / "e.jsonl")))
    (tmp_path / "blank.jsonl").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="has no rows"):
        validate_source(src(kind="jsonl", path=str(tmp_path / "blank.jsonl")))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match=r"'s' \(parquet\): file .*e\.parquet' has no rows"):
        validate_source(src(kind="parquet", path=str(tmp_path / "e.parquet")))


def test_missing_fields(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "x", "score": 1}])
    with pytest.raises(ValueError, match=r"'s': .*a\.jsonl, line 1: text_field 'text' not found; "
                                         r"available fields: \['content', 'score'\]"):
        validate_source(src(kind="jsonl", path=str(path)))
    with pytest.raises(ValueError, match=r"messages_field 'messages' not found"):
        validate_source(src(kind="jsonl", path=str(path), messages_field="messages"))
    with pytest.raises(ValueError, match=r"filter field 'int_score' not found"):
        validate_source(src(kind="jsonl", path=str(path), text_field="content", filters={"int_score": {"min": 4}}))
    pq = write_parquet(tmp_path / "a.parquet", [{"body": "x"}])
    with pytest.raises(ValueError, match=r"a\.parquet, row 1: text_field 'text' not found; .*\['body'\]"):
        validate_source(src(kind="parquet", path=str(pq)))


@pytest.mark.parametrize(
    "filters, message",
    [
        ({"int_score": {"gte": 4}}, r"unknown ops \['gte'\]"),
        ({"int_score": 4}, "must be a non-empty mapping"),
        ({"int_score": {}}, "must be a non-empty mapping"),
        ({"int_score": {"min": "4"}}, r"int_score.min must be a number"),
        ({"int_score": {"min": 5, "max": 1}}, "min > max"),
        ({"lang": {"in": "en"}}, "must be a list"),
    ],
)
def test_bad_filter_specs(tmp_path, filters, message):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "int_score": 1, "lang": "en"}])
    with pytest.raises(ValueError, match=message):
        validate_source(src(kind="jsonl", path=str(path), filters=filters))


def test_weight_and_budget_checks(tmp_path):
    path = str(write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}]))
    with pytest.raises(ValueError, match=r"'s': set either 'weight' or 'max_tokens', not both"):
        validate_source(src(kind="jsonl", path=path, weight=1.0, max_tokens=100))
    with pytest.raises(ValueError, match="weight must be a positive number"):
        validate_source(src(kind="jsonl", path=path, weight=0))
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        validate_source(src(kind="jsonl", path=path, max_tokens=-5))


def test_other_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        SourceConfig.from_any({"name": "s", "kind": "jsonl", "colour": "red"})
    with pytest.raises(ValueError, match="'name' and 'kind' are required"):
        SourceConfig.from_any({"kind": "jsonl"})
    with pytest.raises(ValueError, match="hub source needs 'path'"):
        validate_source(src(kind="hub"))
    with pytest.raises(ValueError, match="sample_by must be one of"):
        validate_source(src(kind="text", path="x", sample_by="page"))
    with pytest.raises(FileNotFoundError, match="scan root"):
        validate_source(src(kind="embedded", path=[str(tmp_path / "nope")]))
    # a local file has no splits: val_split used to read the training file again for validation
    path = str(write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}]))
    with pytest.raises(ValueError, match=r"'s' \(jsonl\): val_split names a hub split; a jsonl source has none"):
        validate_source(src(kind="jsonl", path=path, val_split="test"))


def test_override_sources_rewrites_kind_and_path():
    base = [{"name": "web", "kind": "hub", "path": "org/web", "config_name": "c", "weight": 2.0}]
    out = override_sources(base, {"web": {"kind": "jsonl", "path": "/tmp/w.jsonl"}})
    assert out[0]["kind"] == "jsonl" and out[0]["path"] == "/tmp/w.jsonl" and out[0]["weight"] == 2.0
    assert base[0]["kind"] == "hub"  # input untouched
    with pytest.raises(ValueError, match=r"no source named \['nope'\]"):
        override_sources(base, {"nope": {}})


# --------------------------------------------------------------------------- errors after the first row


def _lines_with(bad: bytes, n: int = 150, at: int = 101, good=lambda i: {"text": f"doc {i}"}) -> bytes:
    """``n`` JSON lines whose line ``at`` (1-based) is ``bad``."""
    lines = [json.dumps(good(i)).encode() for i in range(n)]
    lines[at - 1] = bad
    return b"\n".join(lines) + b"\n"


def _chat(i):
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}


ROW_101_CASES = {
    "bad JSON": (dict(kind="jsonl"), "a.jsonl", _lines_with(b'{"text": "broken'),
                 r"a\.jsonl, line 101: invalid JSON \(Unterminated string starting at: column 10\)"),
    "missing field": (dict(kind="jsonl"), "a.jsonl", _lines_with(b'{"body": "x"}'),
                      r"a\.jsonl, line 101: text_field 'text' not found; available fields: \['body'\]"),
    "bad UTF-8": (dict(kind="jsonl"), "a.jsonl", _lines_with(b'{"text": "caf\xe9"}'),
                  r"a\.jsonl, line 101: not valid UTF-8 \(byte 0xe9 at column 14\)"),
    "not a string": (dict(kind="jsonl"), "a.jsonl", _lines_with(b'{"text": ["x"]}'),
                     r"a\.jsonl, line 101: text_field 'text' must hold a string, got list"),
    "not an object": (dict(kind="jsonl"), "a.jsonl", _lines_with(b'["x"]'),
                      r"a\.jsonl, line 101: expected an object with fields, got list"),
    "nested field": (dict(kind="jsonl", text_field="body.t"), "a.jsonl",
                     _lines_with(b'{"body": {}}', good=lambda i: {"body": {"t": "x"}}),
                     r"a\.jsonl, line 101: text_field 'body\.t' not found; available fields: \['body'\]"),
    "message keys": (dict(kind="jsonl", messages_field="messages"), "a.jsonl",
                     _lines_with(b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}', good=_chat),
                     r"a\.jsonl, line 101: message 2 of messages_field 'messages' needs keys 'role' and 'content'"),
    "filter type": (dict(kind="jsonl", filters={"score": {"min": 3}}), "a.jsonl",
                    _lines_with(b'{"text": "x", "score": "high"}', good=lambda i: {"text": "x", "score": i}),
                    r"a\.jsonl, line 101: filter field 'score' holds 'high', which cannot be compared with \{'min': 3\}"),
    # physical lines count: a blank line before the bad one moves it to line 102
    "blank lines counted": (dict(kind="jsonl"), "a.jsonl", b"\n" + _lines_with(b"{oops"),
                            r"a\.jsonl, line 102: invalid JSON"),
    "gzip": (dict(kind="jsonl"), "a.jsonl.gz", gzip.compress(_lines_with(b"{oops")),
             r"a\.jsonl\.gz, line 101: invalid JSON"),
    "JSON array": (dict(kind="jsonl"), "a.json",
                   json.dumps([{"text": "x"}] * 100 + [{"body": "y"}], indent=0).encode(),
                   r"a\.json, element 101: text_field 'text' not found"),
    "text lines": (dict(kind="text", sample_by="line"), "a.txt",
                   b"\n".join([b"good line"] * 100 + [b"caf\xe9"] + [b"more"] * 20),
                   r"a\.txt, line 101: not valid UTF-8 \(byte 0xe9 at column 4\)"),
    "text paragraphs": (dict(kind="text", sample_by="paragraph"), "a.txt",
                        b"\n".join([b"para", b""] * 50 + [b"caf\xe9"]),
                        r"a\.txt, line 101: not valid UTF-8"),
}


@pytest.mark.parametrize("case", list(ROW_101_CASES))
def test_errors_after_the_first_row_name_file_line_and_field(tmp_path, tok, case):
    kw, name, data, message = ROW_101_CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    s = src(**kw, path=str(path))
    with pytest.raises(ValueError, match=r"^data source 's': " + f"{tmp_path}/" + message) as err:
        validate_source(s, tok)  # checks first rows only (text paragraphs: the file is decoded whole)
        list(iter_documents(s, tok))
    assert err.value.__cause__ is None and "Traceback" not in str(err.value)


def test_parquet_error_names_the_row(tmp_path, tok):
    rows = [_chat(i) for i in range(150)]
    rows[100] = {"messages": None}
    path = write_parquet(tmp_path / "b.parquet", rows)
    s = src(kind="parquet", path=str(path), messages_field="messages")
    validate_source(s, tok)
    with pytest.raises(ValueError, match=r"'s': .*b\.parquet, row 101: messages_field 'messages' must hold a list "
                                         r"of messages, got NoneType"):
        list(iter_documents(s, tok))
    (tmp_path / "c.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"'s': .*c\.parquet: cannot read as parquet"):
        validate_source(src(kind="parquet", path=str(tmp_path / "c.parquet")))
