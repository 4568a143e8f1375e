"""Helpers for the data tests (imported by the test modules of this folder)."""

from __future__ import annotations

import json
from pathlib import Path

EOS = 256  # tiny tokenizer: ids 0..255 are bytes, 256 = <|endoftext|>
IM_START, IM_END = 257, 258


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def byte_ids(text: str) -> list[int]:
    """What the tiny tokenizer produces for plain text."""
    return list(text.encode("utf-8"))


def collect(loader, n: int | None = None) -> list[dict]:
    """The first ``n`` batches (all when None) of a loader, as lists."""
    import itertools

    # islice fetches exactly n batches (a for/break would pull one more from the loader)
    return [{k: v.tolist() for k, v in b.items()} for b in itertools.islice(loader, n)]


# --------------------------------------------------------------------------- a tiny site-packages

PROSE_A = (
    "Read the configuration file and return the settings that it describes. The file is "
    "parsed line by line, and every value that is not recognised is reported to the caller "
    "with the number of the line where it was found, so that it can be fixed by hand."
)
PROSE_B = (
    "A queue of tasks that are waiting for a free worker. Tasks are taken in the order in "
    "which they were added, unless a task has a higher priority, in which case it is moved "
    "to the front of the queue and will be the next one to run when a worker is free."
)
PROSE_C = (
    "This module draws simple charts in the terminal. It is meant for quick looks at data "
    "while working in a shell, when opening a window is not possible or would be too slow, "
    "and it only uses the characters that every terminal is able to show."
)
SHARED = (
    "This text is copied into two packages on purpose. It is long enough to pass the length "
    "filter, and it is written in plain English, so only the de-duplication step can stop it "
    "from appearing twice in the corpus that is built from these small packages."
)
README = (
    "# Charts\n\nThe charts package draws bar charts and line charts with plain text. It is "
    "small, it has no dependencies, and it is easy to use from a script or from the shell, "
    "which is why it is used by the other tools of this project to show their results."
)
CODE_LIKE = "x = f(a[0], b[1]); y = {k: v for k, v in d.items()}; z = [i**2 for i in range(10)]; " * 4
GERMAN = (
    "Liest die Konfigurationsdatei und gibt die darin beschriebenen Einstellungen zurueck. "
    "Jede Zeile wird einzeln gelesen, und jeder unbekannte Wert wird mit seiner Zeilennummer "
    "gemeldet, damit er von Hand korrigiert werden kann, bevor das Programm weiterlaeuft."
)


def _q(text: str) -> str:
    return '"""' + text + '"""'


def make_tree(root: Path) -> Path:
    """Three packages: alpha (2 modules), beta, charts (+README), plus files that must be skipped."""
    (root / "alpha").mkdir(parents=True)
    (root / "alpha" / "__init__.py").write_text(_q(PROSE_A) + "\n")
    (root / "alpha" / "queue.py").write_text(
        f"class Queue:\n    {_q(PROSE_B)}\n\n    def put(self, x):\n        {_q('Too short.')}\n\n"
        f"def shared():\n    {_q(SHARED)}\n\n"
        f"def german():\n    {_q(GERMAN)}\n\n"
        f"def code():\n    {_q(CODE_LIKE)}\n"
    )
    (root / "alpha" / "tests").mkdir()
    (root / "alpha" / "tests" / "test_q.py").write_text(_q(PROSE_C.replace("charts", "tests")) + "\n")
    (root / "alpha" / "broken.py").write_text("def f(:\n    " + _q(PROSE_C) + "\n")  # syntax error: skipped
    (root / "beta.py").write_text(_q(SHARED) + "\n\nasync def go():\n    " + _q(PROSE_B.replace("queue", "line")) + "\n")
    (root / "charts").mkdir()
    (root / "charts" / "__init__.py").write_text(_q(PROSE_C) + "\n")
    (root / "charts" / "README.md").write_text(README + "\n")
    (root / "charts" / "LICENSE.txt").write_text(PROSE_A + "\n")  # licences are skipped
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.py").write_text(_q(PROSE_A.replace("file", "folder")) + "\n")
    return root


# --------------------------------------------------------------------------- tokenizers with a bos token

BOS = 259  # the bos token added by bos_tokenizer()


def bos_tokenizer(adds_bos: bool = True):
    """The tiny tokenizer plus a distinct bos token ``<|begin_of_text|>`` (id 259).

    ``adds_bos``: encoding with special tokens prepends it, as Llama-3's tokenizer does;
    otherwise the token is defined but never added (like SmolLM2-Instruct's ``<|im_start|>``).
    """
    from tokenizers import processors

    from lrc.teachers import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    assert tok.bos_token_id == BOS
    if adds_bos:
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BOS)]
        )
    return tok


def run_twice_at_once(module, name: str, monkeypatch, job) -> tuple[list, list]:
    """``job()`` in two threads at once, with ``module.name`` replaced by a counted copy that first
    sleeps 0.5 s (so both jobs are past their cache check while the first one builds). Returns
    ``(the two results, one entry per call of module.name)``."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    real, calls = getattr(module, name), []

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, slow)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: job(), range(2)))
    return results, calls
