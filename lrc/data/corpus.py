"""The embedded corpus: human-written English text that every install already has.

No data set can be downloaded on the project machines, and nobody's text is
committed to the repository. Yet every Python install ships megabytes of real,
human-written English prose: the docstrings of the standard library and of the
installed packages (plus a few README/CHANGELOG files and the long descriptions
in ``*.dist-info/METADATA``). This module harvests that text offline:

1. **Discover** files under the scan roots (default: the interpreter's standard
   library and its ``site-packages``), in sorted order, skipping caches and test
   directories. Every file gets a *package* name: its top-level directory below
   the root (``transformers``, ``numpy``), or ``stdlib.<module>`` for the
   standard library.
2. **Extract** docstrings with :mod:`ast` (files are parsed, never imported) and
   paragraph blocks of ``.md``/``.rst``/``.txt`` documentation files.
3. **Clean** (``inspect.cleandoc``-style dedent, trailing whitespace, runs of
   blank lines), **filter** (too short, too few letters, too few English
   function words, i.e. code or non-English) and **de-duplicate** on a hash of
   the whitespace/case-normalised text (first occurrence in sorted order wins).
4. **Split by package**: whole packages are held out for validation, chosen
   deterministically by a hash of the package name until ``val_fraction`` of
   the characters is reached, so validation text comes from packages that the
   training split never saw.
5. **Cache** the result as JSON lines (``{"text", "package", "path"}``) under
   ``<cache>/corpus/<fingerprint>/{train,validation}.jsonl`` plus ``stats.json``,
   written atomically. The fingerprint covers the Python version, the extractor
   settings and the list of scanned files (relative path and size), so it is
   deterministic on a given install and changes when packages change.

Entry point: :func:`build_embedded_corpus`. Everything here is standard library
only (and :mod:`lrc.io`, which is too), so worker processes start fast. Concurrent builds of the
same entry take turns under a file lock (``<cache>/.locks/``): the second reads what the first wrote.
"""

from __future__ import annotations

import ast
import gc
import hashlib
import inspect
import json
import os
import re
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from lrc.io import file_lock

__all__ = [
    "CORPUS_VERSION",
    "CorpusFiles",
    "CorpusSettings",
    "Document",
    "ScanRoot",
    "build_embedded_corpus",
    "clean_text",
    "default_cache_dir",
    "default_roots",
    "extract_docstrings",
    "is_english_prose",
    "normalized_hash",
    "read_jsonl",
    "select_heldout_packages",
]

#: Bumped whenever the extraction/cleaning/filtering logic changes (part of the fingerprint).
CORPUS_VERSION = 1

SKIP_DIR_NAMES = frozenset(
    {"__pycache__", "test", "tests", "testing", "idle_test", "site-packages", "dist-packages", "node_modules"}
)
DOC_SUFFIXES = (".md", ".rst", ".txt")
#: Documentation files that are not prose (licences are shared boilerplate, the rest are lists).
SKIP_DOC_PREFIXES = ("license", "licence", "copying", "notice", "authors", "record", "top_level",
                     "entry_points", "requires", "sources", "dependency_links", "installer", "vendor",
                     "cmakelists")

# A small closed-class list: genuine English prose has plenty of these, code and
# other languages have few.
_STOPWORDS = frozenset(
    """a an the of to in on for and or but is are was were be been being it its this that these
    those with as by at from if not no can will would should may must when which who what
    than then there their they we you he she do does has have had into such only also so
    each all any more most other some same use used using returns return""".split()
)
_WORD_RE = re.compile(r"[A-Za-z]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class CorpusSettings:
    """Knobs of the extractor; all of them enter the cache fingerprint.

    Attributes:
        min_chars: documents shorter than this (after cleaning) are dropped.
        max_chars: documentation files are cut into blocks of at most this many
            characters at paragraph boundaries (docstrings longer than this are kept whole).
        min_alpha_frac: minimum fraction of ASCII letters and whitespace.
        min_stopword_frac: minimum fraction of words that are common English function words.
        max_file_bytes: larger source files (generated tables, vendored bundles) are skipped.
        val_fraction: target share of characters held out (whole packages) for validation.
        include_docs: also harvest ``.md``/``.rst``/``.txt`` files and dist-info long descriptions.
    """

    min_chars: int = 200
    max_chars: int = 8000
    min_alpha_frac: float = 0.72
    min_stopword_frac: float = 0.12
    max_file_bytes: int = 1_500_000
    val_fraction: float = 0.06
    include_docs: bool = True


@dataclass(frozen=True)
class ScanRoot:
    """A directory to scan. ``prefix`` is prepended to package names (``"stdlib."``)."""

    path: str
    prefix: str = ""


@dataclass(frozen=True)
class Document:
    """One harvested document."""

    text: str
    package: str
    path: str


@dataclass
class CorpusFiles:
    """Where a built corpus lives, and its statistics."""

    directory: Path
    train: Path
    validation: Path
    stats_path: Path
    fingerprint: str
    stats: dict = field(default_factory=dict)

    def split(self, name: str) -> Path:
        """Path of split ``"train"`` or ``"validation"``."""
        if name not in ("train", "validation"):
            raise ValueError(f"embedded corpus has splits 'train' and 'validation', not {name!r}")
        return self.train if name == "train" else self.validation


# --------------------------------------------------------------------------- text helpers


def clean_text(text: str) -> str:
    """Dedent a docstring-like text, strip trailing spaces and collapse blank-line runs."""
    text = inspect.cleandoc(text.expandtabs(8))
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return _BLANK_RUNS.sub("\n\n", text).strip()


def normalized_hash(text: str) -> str:
    """Hash of the case-folded, whitespace-collapsed text (for de-duplication)."""
    norm = " ".join(text.lower().split())
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).hexdigest()


def is_english_prose(text: str, settings: CorpusSettings = CorpusSettings()) -> bool:
    """Cheap heuristic: long enough, mostly letters/spaces, enough English function words."""
    if len(text) < settings.min_chars:
        return False
    letters = sum(1 for c in text if ("a" <= c <= "z") or ("A" <= c <= "Z") or c in " \n\t")
    if letters / len(text) < settings.min_alpha_frac:
        return False
    words = _WORD_RE.findall(text)
    if len(words) < 20:
        return False
    stop = sum(1 for w in words if w.lower() in _STOPWORDS)
    return stop / len(words) >= settings.min_stopword_frac


_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _collect_docstrings(node: ast.AST, found: list[tuple[int, str]]) -> None:
    """Walk statement lists only (docstrings live in defs, defs are statements)."""
    if isinstance(node, _DEFS):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            value = body[0].value.value
            if isinstance(value, str):
                found.append((body[0].lineno, value))
    for attr in ("body", "orelse", "finalbody", "handlers", "cases"):
        children = getattr(node, attr, None)
        if isinstance(children, list):
            for child in children:
                if isinstance(child, ast.stmt) or isinstance(child, (ast.excepthandler, ast.match_case)):
                    _collect_docstrings(child, found)


def extract_docstrings(source: bytes | str) -> list[str]:
    """Raw docstrings of a module and all its classes/functions, in source order.

    The source is parsed with :func:`ast.parse`, never executed. Returns ``[]`` for
    files that do not parse (Python 2 code, templates, null bytes).
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError, UnicodeDecodeError):
        return []
    found: list[tuple[int, str]] = []
    _collect_docstrings(tree, found)
    found.sort(key=lambda item: item[0])
    return [text for _, text in found]


def split_blocks(text: str, max_chars: int) -> list[str]:
    """Cut a documentation file into blocks of whole paragraphs of at most ``max_chars``.

    A single paragraph longer than ``max_chars`` becomes its own block.
    """
    blocks: list[str] = []
    current: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if current and size + len(para) + 2 > max_chars:
            blocks.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        blocks.append("\n\n".join(current))
    return blocks


def _metadata_description(raw: str) -> str:
    """Long description (the body after the RFC 822 headers) of a ``METADATA`` file."""
    head, sep, body = raw.partition("\n\n")
    if not sep:
        return ""
    if "Description:" in head and not body.strip():  # old metadata with an indented header
        match = re.search(r"^Description: (.*)", head, flags=re.M | re.S)
        return match.group(1) if match else ""
    return body


# --------------------------------------------------------------------------- discovery


def default_roots() -> list[ScanRoot]:
    """The running interpreter's standard library and its site-packages directories."""
    paths = sysconfig.get_paths()
    roots = [ScanRoot(paths["stdlib"], "stdlib.")]
    seen = {os.path.realpath(paths["stdlib"])}
    for key in ("purelib", "platlib"):
        real = os.path.realpath(paths[key])
        if real not in seen and os.path.isdir(real):
            seen.add(real)
            roots.append(ScanRoot(paths[key], ""))
    return roots


def _package_of(rel: str, prefix: str) -> str:
    top = rel.split("/", 1)[0]
    if top.endswith(".py"):
        top = top[:-3]
    if top.endswith(".dist-info"):
        top = _dist_package(top)
    return prefix + top


def _dist_package(dist_info_name: str) -> str:
    """Distribution ``foo_bar-1.0.dist-info`` -> package name ``foo_bar``."""
    return dist_info_name[: -len(".dist-info")].rsplit("-", 1)[0].lower().replace("-", "_")


def discover_files(roots: Sequence[ScanRoot], settings: CorpusSettings) -> list[tuple[str, str, str, int]]:
    """``(root, relative path, package, size)`` of every file to harvest, sorted by path within each root."""
    out: list[tuple[str, str, str, int]] = []
    for root in roots:
        found: list[tuple[str, str, str, int]] = []
        base = os.path.abspath(root.path)
        if not os.path.isdir(base):
            raise FileNotFoundError(f"embedded corpus: scan root {base!r} is not a directory")
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = os.path.relpath(dirpath, base)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
            in_dist_info = rel_dir.endswith(".dist-info") or ".dist-info/" in rel_dir
            dirnames[:] = sorted(
                d for d in dirnames
                if d not in SKIP_DIR_NAMES and not d.startswith(".") and not d.endswith(".egg-info")
            )
            for name in sorted(filenames):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                low = name.lower()
                if in_dist_info:
                    if not (settings.include_docs and name == "METADATA"):
                        continue
                elif low.endswith(".py"):
                    pass
                elif settings.include_docs and low.endswith(DOC_SUFFIXES):
                    if low.startswith(SKIP_DOC_PREFIXES):
                        continue
                else:
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
                if size == 0 or size > settings.max_file_bytes:
                    continue
                found.append((base, rel, _package_of(rel, root.prefix), size))
        out.extend(sorted(found, key=lambda f: f[1]))  # lexicographic by relative path
    return out


# --------------------------------------------------------------------------- extraction


def _harvest_file(base: str, rel: str, package: str, settings: CorpusSettings) -> list[Document]:
    """Cleaned, filtered (not yet de-duplicated) documents of one file."""
    path = os.path.join(base, rel)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:
        return []
    if rel.endswith(".py"):
        texts = [clean_text(t) for t in extract_docstrings(raw)]
    else:
        decoded = raw.decode("utf-8", errors="replace")
        if rel.endswith("METADATA"):
            decoded = _metadata_description(decoded)
        texts = [clean_text(block) for block in split_blocks(decoded, settings.max_chars)]
    return [Document(t, package, rel) for t in texts if is_english_prose(t, settings)]


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector (reference counting goes on).

    :func:`ast.parse` allocates millions of short-lived nodes, and every few hundred allocations
    the collector scans the young ones: a third of the harvest's time. Syntax trees hold no
    reference cycles, so reference counting alone frees each tree as soon as its file is done.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _harvest_many(args: tuple[list[tuple[str, str, str, int]], CorpusSettings]) -> list[list[Document]]:
    files, settings = args
    with _cyclic_gc_paused():
        return [_harvest_file(base, rel, pkg, settings) for base, rel, pkg, _ in files]


def harvest(files: list[tuple[str, str, str, int]], settings: CorpusSettings, workers: int) -> list[Document]:
    """Extract documents from ``files`` (in order), in ``workers`` processes when > 1, de-duplicated."""
    if workers > 1 and len(files) > 64:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # Interleaved shards balance the big packages across workers; fork keeps start-up
        # cheap (workers only run this stdlib-only module).
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        n_shards = workers * 8
        shards = [files[i::n_shards] for i in range(n_shards)]
        from lrc.progress import progress

        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool, progress(
            "embedded corpus: harvesting docstrings", total=len(files), unit="files"
        ) as advance:
            shard_results = []
            for shard, result in zip(shards, pool.map(_harvest_many, [(s, settings) for s in shards])):
                shard_results.append(result)
                advance(len(shard))
        per_file: list[list[Document]] = [[] for _ in files]
        for i, result in enumerate(shard_results):
            per_file[i::n_shards] = result
    else:
        per_file = _harvest_many((files, settings))
    seen: set[str] = set()
    docs: list[Document] = []
    for file_docs in per_file:
        for doc in file_docs:
            key = normalized_hash(doc.text)
            if key not in seen:
                seen.add(key)
                docs.append(doc)
    return docs


def select_heldout_packages(chars_per_package: dict[str, int], val_fraction: float) -> set[str]:
    """Whole packages for validation: ~``val_fraction`` of all characters.

    Packages are visited in the order of a hash of their name (deterministic, independent
    of sizes and of the scan order) and added while they fit under the target; a package
    that would overshoot is skipped, so one huge package cannot swallow the validation share.
    """
    total = sum(chars_per_package.values())
    target = val_fraction * total
    chosen: set[str] = set()
    held = 0
    for name in sorted(chars_per_package, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        size = chars_per_package[name]
        if held + size <= target:
            chosen.add(name)
            held += size
    if not chosen and val_fraction > 0 and len(chars_per_package) > 1:
        # Tiny corpora: every package exceeds the target; hold out the smallest one.
        chosen.add(min(chars_per_package, key=lambda n: (chars_per_package[n], n)))
    return chosen


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$LRC_CACHE`` or ``~/.cache/lrc``."""
    return Path(os.environ.get("LRC_CACHE") or Path.home() / ".cache" / "lrc")


def _fingerprint(files: list[tuple[str, str, str, int]], roots: Sequence[ScanRoot], settings: CorpusSettings) -> str:
    h = hashlib.sha256()
    h.update(f"v{CORPUS_VERSION}|py{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}|".encode())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    for root in roots:
        h.update(f"|root:{root.prefix}".encode())
    for _, rel, pkg, size in files:
        h.update(f"\n{pkg}\t{rel}\t{size}".encode())
    return h.hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_jsonl(path: Path, docs: Iterable[Document]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc.text, "package": doc.package, "path": doc.path}, ensure_ascii=False))
            fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a JSON-lines file."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _split_stats(docs: list[Document]) -> dict:
    chars = sum(len(d.text) for d in docs)
    return {
        "documents": len(docs),
        "characters": chars,
        # UTF-8 bytes = tokens of a byte-level tokenizer (without the eos per document).
        "utf8_bytes": sum(len(d.text.encode("utf-8")) for d in docs),
        "packages": len({d.package for d in docs}),
    }


# --------------------------------------------------------------------------- entry point


def build_embedded_corpus(
    cache_dir: str | os.PathLike | None = None,
    *,
    roots: Sequence[ScanRoot | str | os.PathLike] | None = None,
    settings: CorpusSettings | None = None,
    workers: int | None = None,
    force: bool = False,
) -> CorpusFiles:
    """Build (or reuse from cache) the embedded corpus and return its files.

    Args:
        cache_dir: cache root (default :func:`default_cache_dir`); the corpus goes to
            ``<cache_dir>/corpus/<fingerprint>/``.
        roots: directories to scan (``ScanRoot`` or plain paths); default
            :func:`default_roots` (stdlib + site-packages). Tests pass small temp dirs.
        settings: extractor settings (:class:`CorpusSettings`).
        workers: processes for parsing (default ``min(os.cpu_count(), 8)``).
        force: rebuild even if the cache exists.

    Returns:
        :class:`CorpusFiles` with ``train``/``validation`` JSON-lines paths and ``stats``.

    Raises:
        FileNotFoundError: a root does not exist.
        ValueError: nothing usable was found under the roots.
    """
    settings = settings or CorpusSettings()
    scan_roots = [r if isinstance(r, ScanRoot) else ScanRoot(os.fspath(r)) for r in (roots or default_roots())]
    t0 = time.perf_counter()
    files = discover_files(scan_roots, settings)
    fingerprint = _fingerprint(files, scan_roots, settings)
    directory = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "corpus" / fingerprint
    out = CorpusFiles(
        directory=directory,
        train=directory / "train.jsonl",
        validation=directory / "validation.jsonl",
        stats_path=directory / "stats.json",
        fingerprint=fingerprint,
    )
    # one builder per entry: a concurrent job sharing the cache waits, then reads what it wrote
    with file_lock(directory.parent.parent / ".locks" / f"corpus-{fingerprint}.lock"):
        return _build_locked(out, files, scan_roots, settings, workers, force, t0)


def _build_locked(
    out: CorpusFiles, files: list[tuple[str, str, str, int]], scan_roots: Sequence[ScanRoot],
    settings: CorpusSettings, workers: int | None, force: bool, t0: float,
) -> CorpusFiles:
    """:func:`build_embedded_corpus` once it holds the entry's lock: read it, or build it."""
    directory, fingerprint = out.directory, out.fingerprint
    if not force and out.stats_path.is_file() and out.train.is_file() and out.validation.is_file():
        out.stats = json.loads(out.stats_path.read_text(encoding="utf-8"))
        return out

    n_workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    docs = harvest(files, settings, n_workers)
    if not docs:
        raise ValueError(
            f"embedded corpus: no English documents of >= {settings.min_chars} characters found under "
            f"{[r.path for r in scan_roots]}"
        )
    chars_per_package: dict[str, int] = {}
    for doc in docs:
        chars_per_package[doc.package] = chars_per_package.get(doc.package, 0) + len(doc.text)
    heldout = select_heldout_packages(chars_per_package, settings.val_fraction)
    train = [d for d in docs if d.package not in heldout]
    val = [d for d in docs if d.package in heldout]

    directory.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out.train, train)
    _write_jsonl(out.validation, val)
    stats = {
        "fingerprint": fingerprint,
        "corpus_version": CORPUS_VERSION,
        "python": sys.version.split()[0],
        "roots": [asdict(r) for r in scan_roots],
        "settings": asdict(settings),
        "files_scanned": len(files),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "train": _split_stats(train),
        "validation": _split_stats(val),
        "validation_packages": sorted(heldout),
    }
    _atomic_write_text(out.stats_path, json.dumps(stats, indent=2, sort_keys=True))
    out.stats = stats
    return out
