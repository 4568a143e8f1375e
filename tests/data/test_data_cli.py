"""Bad data through the real ``lrc-distill`` (in this process) on a tiny teacher: the data is read
up front, so a bad row, too little data or no validation sequence ends the run with exit status 2 and
one message naming the file, line and field or saying what to change, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import cli, cli_args, corpus, write_corpus  # noqa: F401  (corpus is a fixture)


def _line_101(path: Path, bad: bytes) -> Path:
    """A 200-document corpus whose line 101 is ``bad``."""
    lines = write_corpus(path, 200).read_bytes().splitlines()
    lines[100] = bad
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _docs(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


CASES = {
    "bad_json_line_101": (lambda p: _line_101(p, b'{"text": "broken'), [],
                          "data source 'toy': {path}, line 101: invalid JSON (Unterminated string starting at: "
                          "column 10)"),
    "missing_field_line_101": (lambda p: _line_101(p, b'{"body": "no text here"}'), [],
                               "data source 'toy': {path}, line 101: text_field 'text' not found; "
                               "available fields: ['body']"),
    "bad_utf8_line_101": (lambda p: _line_101(p, b'{"text": "caf\xe9"}'), [],
                          "data source 'toy': {path}, line 101: not valid UTF-8 (byte 0xe9 at column 14)"),
    "batch_larger_than_the_data": (lambda p: _docs(p, ["a few words of text, not many"] * 10), ["data.batch_size=64"],
                                   "no full training batch: the data gives 7 training sequences of seq_len=32 per "
                                   "epoch, fewer than batch_size=64; lower batch_size or seq_len, or add data"),
    "one_token_corpus": (lambda p: _docs(p, ["a"]), [],
                         "no training sequences of seq_len=32: the training text ('toy': 2 tokens) does not fill "
                         "one sequence; lower seq_len or add text"),
    "one_long_document": (lambda p: _docs(p, ["word " * 400]), [],
                          "no validation sequences of seq_len=32: 'toy' holds out 0 tokens in 0 documents (carved) "
                          "(a source of one document cannot hold one out). Validation needs at least one full "
                          "sequence: lower seq_len, raise val_fraction or val_tokens, add documents, or give a "
                          "hub source its own held-out split (val_split)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_fails_up_front_with_one_message(tmp_path, capsys, case):
    make, extra, message = CASES[case]
    data = make(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    code, log = cli(capsys, "distill", *cli_args(data, out, *extra))
    assert code == 2, log[-2000:]
    assert f"lrc-distill: error: {message.format(path=data)}" in log and "Traceback" not in log, log[-2000:]
    assert not out.exists() or [p.name for p in out.iterdir() if not p.name.startswith(".")] == []  # no config.yaml, no checkpoint


def test_the_data_is_tokenized_and_packed_once_per_run(corpus, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Checking up front costs nothing: Lightning's prepare_data/setup reuse what the check built."""
    import lrc.data.cache as cache
    import lrc.data.datamodule as dmod

    calls = {"tokenize": 0, "pack": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(cache, "tokenized_docs", counting("tokenize", cache.tokenized_docs))
    monkeypatch.setattr(dmod, "build_packed_source", counting("pack", dmod.build_packed_source))
    code, log = cli(capsys, "distill", *cli_args(corpus, tmp_path / "run", "trainer.max_steps=2",
                                                 "export.enabled=false"))
    assert code == 0, log[-2000:]
    assert calls == {"tokenize": 1, "pack": 1}  # one source, validation carved from it
