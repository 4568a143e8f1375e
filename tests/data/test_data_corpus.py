"""The embedded corpus: extraction, cleaning, filtering, de-duplication, package split, cache."""

from __future__ import annotations

import json
import os
import time

import pytest

from datatest_utils import CODE_LIKE, GERMAN, PROSE_A, PROSE_B, PROSE_C, README, SHARED, _q, make_tree, run_twice_at_once

from lrc.data import corpus as corpus_mod
from lrc.data.corpus import (
    CorpusSettings,
    ScanRoot,
    build_embedded_corpus,
    clean_text,
    extract_docstrings,
    is_english_prose,
    read_jsonl,
    select_heldout_packages,
)

def test_extract_docstrings_in_source_order_without_importing():
    src = (
        "import this_module_does_not_exist\n"
        '"""Module."""\n'  # not first statement: not a docstring
        "class A:\n    'Class A.'\n    def m(self):\n        'Method m.'\n"
        "if True:\n    def g():\n        'Nested in if.'\n"
        "def f():\n    x = 1\n    'Not a docstring.'\n"
    )
    assert extract_docstrings(src) == ["Class A.", "Method m.", "Nested in if."]
    assert extract_docstrings('"""Mod."""\nasync def a():\n    """Async."""\n') == ["Mod.", "Async."]
    assert extract_docstrings("def f(:\n") == []


def test_clean_and_filters():
    assert clean_text("First line.\n\n        Indented body.\n        More.\n\n\n\n    ") == (
        "First line.\n\nIndented body.\nMore."
    )
    assert is_english_prose(PROSE_A)
    assert not is_english_prose(PROSE_A[:150])  # too short
    assert not is_english_prose(CODE_LIKE)
    assert not is_english_prose(GERMAN)


def test_select_heldout_packages_by_hand():
    sizes = {"a": 50, "b": 30, "c": 15, "d": 5}
    chosen = select_heldout_packages(sizes, 0.2)  # target 20 chars of 100
    assert sum(sizes[p] for p in chosen) <= 20 and chosen
    assert chosen == select_heldout_packages(dict(reversed(sizes.items())), 0.2)  # order-independent
    assert select_heldout_packages(sizes, 0.0) == set()
    # every package bigger than the target: the smallest one is held out
    assert select_heldout_packages({"x": 10, "y": 20}, 0.01) == {"x"}


def test_build_small_tree(tmp_path):
    root = make_tree(tmp_path / "site")
    settings = CorpusSettings(val_fraction=0.3)
    c = build_embedded_corpus(tmp_path / "cache", roots=[root], settings=settings, workers=1)
    assert c.directory == tmp_path / "cache" / "corpus" / c.fingerprint
    train = list(read_jsonl(c.train))
    val = list(read_jsonl(c.validation))
    texts = [r["text"] for r in train + val]
    expected = {PROSE_A, PROSE_B, SHARED, PROSE_B.replace("queue", "line"), PROSE_C, README}
    assert set(texts) == expected and len(texts) == len(expected)  # dedup: SHARED once
    by_text = {r["text"]: r for r in train + val}
    assert by_text[SHARED]["package"] == "alpha" and by_text[SHARED]["path"] == "alpha/queue.py"  # first wins
    assert by_text[README]["package"] == "charts" and by_text[README]["path"] == "charts/README.md"
    assert by_text[PROSE_B.replace("queue", "line")]["package"] == "beta"
    # split by package: disjoint, both non-empty
    train_pkgs, val_pkgs = {r["package"] for r in train}, {r["package"] for r in val}
    assert train_pkgs and val_pkgs and not train_pkgs & val_pkgs
    assert sorted(val_pkgs) == c.stats["validation_packages"]
    stats = json.loads(c.stats_path.read_text())
    assert stats["train"]["documents"] == len(train) and stats["validation"]["documents"] == len(val)
    assert stats["train"]["characters"] == sum(len(r["text"]) for r in train)
    assert stats["validation"]["packages"] == len(val_pkgs)


def test_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "site")
    a = build_embedded_corpus(tmp_path / "c1", roots=[root], workers=1)
    b = build_embedded_corpus(tmp_path / "c2", roots=[ScanRoot(str(root))], workers=2)
    assert a.fingerprint == b.fingerprint
    assert a.train.read_bytes() == b.train.read_bytes()
    assert a.validation.read_bytes() == b.validation.read_bytes()
    # second call with the same cache: no harvesting at all
    monkeypatch.setattr(corpus_mod, "harvest", lambda *a, **k: pytest.fail("cache not used"))
    again = build_embedded_corpus(tmp_path / "c1", roots=[root])
    assert again.train == a.train and again.stats["train"] == a.stats["train"]
    # a changed file changes the fingerprint
    (root / "charts" / "__init__.py").write_text(_q(PROSE_C + " And one more sentence.") + "\n")
    monkeypatch.undo()
    changed = build_embedded_corpus(tmp_path / "c1", roots=[root], workers=1)
    assert changed.fingerprint != a.fingerprint


def test_concurrent_builds_of_one_entry_harvest_once(tmp_path, monkeypatch):
    """Two builders of the same cache entry at once (threads here; processes take the same file
    lock): the second waits for the first and reads what it wrote instead of harvesting again."""
    root = make_tree(tmp_path / "site")
    (a, b), calls = run_twice_at_once(
        corpus_mod, "harvest", monkeypatch,
        lambda: build_embedded_corpus(tmp_path / "cache", roots=[root], workers=1))
    assert len(calls) == 1
    assert a.stats == b.stats and a.train.read_bytes() == b.train.read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache" / "corpus").iterdir()) == [a.fingerprint]


def test_parallel_harvest_matches_serial(tmp_path):
    root = tmp_path / "many"
    for i in range(80):  # > 64 files: the process pool is used
        (root / f"p{i % 7}").mkdir(parents=True, exist_ok=True)
        (root / f"p{i % 7}" / f"m{i}.py").write_text(_q(f"Module number {i}. " + PROSE_A) + "\n")
    files = corpus_mod.discover_files([ScanRoot(str(root))], CorpusSettings())
    serial = corpus_mod.harvest(files, CorpusSettings(), workers=1)
    parallel = corpus_mod.harvest(files, CorpusSettings(), workers=2)
    assert serial == parallel and len(serial) == 80


def test_harvest_pauses_the_cyclic_collector_and_restores_its_state(tmp_path, monkeypatch):
    """Parsing runs with the cyclic collector paused (a third of the harvest's time on this
    machine) and leaves it as it found it, on or off, also when a file fails."""
    import gc

    root = make_tree(tmp_path / "site")
    files = corpus_mod.discover_files([ScanRoot(str(root))], CorpusSettings())
    seen = []
    real = corpus_mod._harvest_file
    monkeypatch.setattr(corpus_mod, "_harvest_file", lambda *a: seen.append(gc.isenabled()) or real(*a))
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            docs = corpus_mod._harvest_many((files, CorpusSettings()))
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
    assert seen and not any(seen)
    assert sum(map(len, docs)) > 0

    def boom(*a):
        raise OSError("disk gone")

    monkeypatch.setattr(corpus_mod, "_harvest_file", boom)
    with pytest.raises(OSError):
        corpus_mod._harvest_many((files, CorpusSettings()))
    assert gc.isenabled()


def test_empty_tree_and_missing_root(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "m.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no English documents"):
        build_embedded_corpus(tmp_path / "cache", roots=[tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_embedded_corpus(tmp_path / "cache", roots=[tmp_path / "missing"])


@pytest.mark.slow
def test_real_installed_packages(smollm2_cache):
    """The default corpus on this install: size and split. Built in the session's cache (the one
    the real-teacher jobs use, so a test run harvests the installed packages once, ~30-100 s)."""
    start = time.perf_counter()
    c = build_embedded_corpus(smollm2_cache)
    s = c.stats
    print(f"\nembedded corpus: {json.dumps({k: s[k] for k in ('train', 'validation', 'files_scanned')})}"
          f" ready in {time.perf_counter() - start:.1f}s")
    assert s["train"]["documents"] > 5_000 and s["train"]["characters"] > 5_000_000
    total = s["train"]["characters"] + s["validation"]["characters"]
    assert 0.02 <= s["validation"]["characters"] / total <= 0.07
    train_pkgs = {r["package"] for r in read_jsonl(c.train)}
    val_pkgs = {r["package"] for r in read_jsonl(c.validation)}
    assert val_pkgs and not train_pkgs & val_pkgs
    assert any(p.startswith("stdlib.") for p in train_pkgs | val_pkgs)
    assert {"torch", "numpy"} <= train_pkgs | val_pkgs
    # a known standard-library docstring made it through cleaning and filtering
    texts = (r["text"] for r in list(read_jsonl(c.train)) + list(read_jsonl(c.validation)))
    assert any(t.startswith("Return the total number of seconds in the duration") or
               "JSON (JavaScript Object Notation)" in t for t in texts)
    assert os.path.getsize(c.train) > 5_000_000
