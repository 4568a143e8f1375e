"""Data sources: what to read, how to turn a row into training text, and checks up front.

A :class:`SourceConfig` names one source of documents:

* ``hub``: a Hugging Face dataset id, read with
  ``datasets.load_dataset(path, name=config_name, split=split, streaming=streaming)``;
* ``jsonl`` / ``parquet`` / ``text``: local files (a path, a glob, or a list of them),
  read with plain readers (``json``, ``pyarrow.parquet``, ``open``) that stream row by
  row and leave no cache behind;
* ``embedded``: the offline corpus of :mod:`lrc.data.corpus` (docstrings of the
  installed packages), with its own held-out ``validation`` split.

A row becomes a document either through ``text_field`` (dotted paths such as
``metadata.text`` reach into nested dicts) or, when ``messages_field`` is set, by
rendering its list of messages with the tokenizer's chat template
(``apply_chat_template(messages, tokenize=False)``) and training on that text.
``message_keys``/``role_map`` adapt other message schemas, e.g. ShareGPT
(``{"from": "human", "value": ...}``, see :data:`SHAREGPT`).

:func:`validate_source` checks a source before any work and raises one clear
``ValueError``/``FileNotFoundError`` naming the source and the problem.
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

__all__ = [
    "FILTER_OPS",
    "KINDS",
    "LOCAL_KINDS",
    "SHAREGPT",
    "SourceConfig",
    "apply_filters",
    "get_field",
    "iter_documents",
    "iter_rows",
    "normalize_messages",
    "override_sources",
    "render_messages",
    "resolve_files",
    "row_to_text",
    "validate_source",
]

KINDS = ("hub", "jsonl", "parquet", "text", "embedded")
LOCAL_KINDS = ("jsonl", "parquet", "text")
FILTER_OPS = ("min", "max", "equals", "in")
TEXT_SAMPLE_BY = ("document", "paragraph", "line")

#: Key/role mapping for ShareGPT-style conversations (OpenHermes-2.5, ...).
SHAREGPT: dict[str, dict[str, str]] = {
    "message_keys": {"role": "from", "content": "value"},
    "role_map": {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"},
}


@dataclass
class SourceConfig:
    """One source of training documents.

    Attributes:
        name: unique name (used in errors, logs and ``tokens_per_source``).
        kind: one of ``hub``, ``jsonl``, ``parquet``, ``text``, ``embedded``.
        path: hub dataset id; or a local file, glob, or list of files/globs; for
            ``embedded`` optionally a list of directories to scan instead of the install.
        config_name: hub configuration (``load_dataset(path, name=...)``).
        split: split to train on (hub; ``embedded`` always trains on ``train``).
        val_split: a dedicated held-out split (hub split name). ``embedded`` uses its
            held-out packages (``validation``) automatically. Without one, the data module
            carves validation documents off the end of the source.
        text_field: field holding the document text (dotted path for nested fields).
        messages_field: field holding a list of chat messages; when set the messages are
            rendered with the tokenizer's chat template and trained on as plain text.
        message_keys: where role/content live in each message,
            default ``{"role": "role", "content": "content"}``.
        role_map: renames roles (``{"human": "user", "gpt": "assistant"}``).
        filters: ``{field: {"min"|"max"|"equals"|"in": value}}``; a row is kept when all hold.
        weight: mixture weight (mutually exclusive with ``max_tokens``).
        max_tokens: token budget for this source (mutually exclusive with ``weight``).
        streaming: read lazily and pack on the fly instead of caching packed arrays.
        sample_by: for ``text`` files: one document per ``document`` (file),
            ``paragraph`` (blank-line separated) or ``line``.
        revision: hub revision (branch, tag or commit) to pin.
    """

    name: str
    kind: str
    path: str | list[str] | None = None
    config_name: str | None = None
    split: str = "train"
    val_split: str | None = None
    text_field: str = "text"
    messages_field: str | None = None
    message_keys: dict[str, str] | None = None
    role_map: dict[str, str] | None = None
    filters: dict[str, dict[str, Any]] | None = None
    weight: float | None = None
    max_tokens: int | None = None
    streaming: bool = False
    sample_by: str = "document"
    revision: str | None = None

    @classmethod
    def from_any(cls, obj: "SourceConfig | Mapping[str, Any]") -> "SourceConfig":
        """Build from a ``SourceConfig``, a dict or an OmegaConf ``DictConfig``."""
        if isinstance(obj, SourceConfig):
            return obj
        try:  # OmegaConf containers -> plain python
            from omegaconf import DictConfig, OmegaConf

            if isinstance(obj, DictConfig):
                obj = OmegaConf.to_container(obj, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        if not isinstance(obj, Mapping):
            raise ValueError(f"a data source must be a mapping or SourceConfig, got {type(obj).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        name = obj.get("name", "<unnamed>")
        if unknown:
            raise ValueError(f"data source {name!r}: unknown keys {unknown}; known keys: {sorted(known)}")
        if "name" not in obj or "kind" not in obj:
            raise ValueError(f"data source {name!r}: 'name' and 'kind' are required")
        data = dict(obj)
        if isinstance(data.get("path"), tuple):
            data["path"] = list(data["path"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for fingerprints and logging)."""
        return asdict(self)

    @property
    def paths(self) -> list[str]:
        """``path`` as a list."""
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else [str(p) for p in self.path]


# --------------------------------------------------------------------------- row helpers


def get_field(row: Mapping[str, Any], dotted: str) -> Any:
    """``row["a"]["b"]`` for ``"a.b"``; raises ``KeyError`` naming the missing part."""
    cur: Any = row
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _has_field(row: Mapping[str, Any], dotted: str) -> bool:
    try:
        get_field(row, dotted)
        return True
    except KeyError:
        return False


def apply_filters(row: Mapping[str, Any], filters: Mapping[str, Mapping[str, Any]] | None) -> bool:
    """True when the row passes every filter (a missing or null field fails)."""
    if not filters:
        return True
    for fld, spec in filters.items():
        try:
            value = get_field(row, fld)
        except KeyError:
            return False
        if value is None:
            return False
        if "min" in spec and not value >= spec["min"]:
            return False
        if "max" in spec and not value <= spec["max"]:
            return False
        if "equals" in spec and value != spec["equals"]:
            return False
        if "in" in spec and value not in spec["in"]:
            return False
    return True


def normalize_messages(messages: Any, src: SourceConfig) -> list[dict[str, str]]:
    """Map a row's messages to ``[{"role", "content"}]`` using ``message_keys``/``role_map``."""
    if isinstance(messages, str):  # some datasets store the conversation as a JSON string
        messages = json.loads(messages)
    if not isinstance(messages, (list, tuple)):
        raise ValueError(
            f"data source {src.name!r}: field {src.messages_field!r} must hold a list of messages, "
            f"got {type(messages).__name__}"
        )
    keys = {"role": "role", "content": "content", **(src.message_keys or {})}
    roles = src.role_map or {}
    out = []
    for m in messages:
        if not isinstance(m, Mapping) or keys["role"] not in m or keys["content"] not in m:
            raise ValueError(
                f"data source {src.name!r}: each message needs keys {keys['role']!r} and {keys['content']!r} "
                f"(set message_keys for other schemas); got {m!r:.200}"
            )
        role = m[keys["role"]]
        out.append({"role": roles.get(role, role), "content": m[keys["content"]] or ""})
    return out


def render_messages(messages: list[dict[str, str]], tokenizer) -> str:
    """The chat-template text of a conversation (no tokenization, no generation prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False)


def row_to_text(row: Mapping[str, Any], src: SourceConfig, tokenizer=None) -> str:
    """The training text of one row: ``text_field``, or rendered ``messages_field``."""
    if src.messages_field:
        if tokenizer is None:
            raise ValueError(f"data source {src.name!r}: rendering messages needs a tokenizer")
        return render_messages(normalize_messages(get_field(row, src.messages_field), src), tokenizer)
    value = get_field(row, src.text_field)
    return "" if value is None else str(value)


# --------------------------------------------------------------------------- readers


def resolve_files(src: SourceConfig) -> list[Path]:
    """Sorted files of a local source; each path or glob must match at least one file."""
    if not src.paths:
        raise ValueError(f"data source {src.name!r} ({src.kind}): 'path' is required")
    out: list[Path] = []
    for pattern in src.paths:
        pattern = os.path.expanduser(pattern)
        if globlib.has_magic(pattern):
            matches = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"data source {src.name!r} ({src.kind}): no file matches {pattern!r}")
            out.extend(Path(m) for m in matches)
        else:
            if not os.path.isfile(pattern):
                raise FileNotFoundError(f"data source {src.name!r} ({src.kind}): file not found: {pattern!r}")
            out.append(Path(pattern))
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_json_file(path: Path) -> Iterator[dict]:
    with _open_text(path) as fh:
        first = ""
        while not first:
            ch = fh.read(1)
            if not ch:
                return
            if not ch.isspace():
                first = ch
        if first == "[":  # a JSON array of objects
            data = json.loads(first + fh.read())
            yield from data
            return
        line = first + fh.readline()
        yield json.loads(line)
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _iter_parquet_file(path: Path, columns: list[str] | None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        yield from batch.to_pylist()


def _iter_text_file(path: Path, sample_by: str) -> Iterator[dict]:
    with _open_text(path) as fh:
        if sample_by == "line":
            for line in fh:
                line = line.rstrip("\n")
                if line.strip():
                    yield {"text": line}
            return
        content = fh.read()
    if sample_by == "document":
        if content.strip():
            yield {"text": content}
        return
    para: list[str] = []
    for line in content.splitlines():
        if line.strip():
            para.append(line)
        elif para:
            yield {"text": "\n".join(para)}
            para = []
    if para:
        yield {"text": "\n".join(para)}


def _needed_columns(src: SourceConfig) -> list[str]:
    cols = {(src.messages_field or src.text_field).split(".")[0]}
    cols.update(f.split(".")[0] for f in (src.filters or {}))
    return sorted(cols)


def _iter_local_rows(src: SourceConfig, files: Sequence[Path]) -> Iterator[dict]:
    for path in files:
        if src.kind == "jsonl":
            yield from _iter_json_file(path)
        elif src.kind == "parquet":
            yield from _iter_parquet_file(path, _needed_columns(src))
        else:
            yield from _iter_text_file(path, src.sample_by)


def _load_hub(src: SourceConfig, split: str):
    import datasets

    return datasets.load_dataset(
        src.path, name=src.config_name, split=split, streaming=src.streaming, revision=src.revision
    )


def _embedded_files(src: SourceConfig, cache_dir: str | os.PathLike | None):
    from lrc.data.corpus import build_embedded_corpus

    return build_embedded_corpus(cache_dir, roots=src.paths or None)


def _check_first_row(src: SourceConfig, row: Mapping[str, Any], where: str) -> None:
    field_name = src.messages_field or src.text_field
    if not _has_field(row, field_name):
        kind = "messages_field" if src.messages_field else "text_field"
        raise ValueError(
            f"data source {src.name!r}: {kind} {field_name!r} not found in the first row of {where}; "
            f"available fields: {sorted(row)}"
        )
    if src.messages_field:
        normalize_messages(get_field(row, src.messages_field), src)
    for fld in src.filters or {}:
        if not _has_field(row, fld):
            raise ValueError(
                f"data source {src.name!r}: filter field {fld!r} not found in the first row of {where}; "
                f"available fields: {sorted(row)}"
            )


def iter_rows(
    src: SourceConfig,
    split: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    apply_row_filters: bool = True,
) -> Iterator[dict]:
    """Rows of ``src`` (after its filters), in a deterministic order.

    ``split`` defaults to ``src.split``; for ``embedded`` it is ``train`` or ``validation``.
    The first row is checked for the text/messages/filter fields.
    """
    split = split or src.split
    if src.kind in LOCAL_KINDS:
        files = resolve_files(src)
        rows: Iterator[dict] = _iter_local_rows(src, files)
        where = str(files[0])
    elif src.kind == "embedded":
        from lrc.data.corpus import read_jsonl

        corpus = _embedded_files(src, cache_dir)
        rows = read_jsonl(corpus.split("validation" if split == "validation" else "train"))
        where = f"the embedded corpus ({split})"
    elif src.kind == "hub":
        rows = iter(_load_hub(src, split))
        where = f"hub dataset {src.path!r} ({src.config_name}, {split})"
    else:
        raise ValueError(f"data source {src.name!r}: unknown kind {src.kind!r}; expected one of {KINDS}")
    first = True
    for row in rows:
        if first and src.kind != "embedded":
            _check_first_row(src, row, where)
        first = False
        if not apply_row_filters or apply_filters(row, src.filters):
            yield row


def iter_documents(
    src: SourceConfig,
    tokenizer=None,
    split: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Training texts of ``src`` (filtered rows, messages rendered), skipping empty ones."""
    for row in iter_rows(src, split, cache_dir=cache_dir):
        text = row_to_text(row, src, tokenizer)
        if text:
            yield text


# --------------------------------------------------------------------------- validation


def _validate_filters(src: SourceConfig) -> None:
    if src.filters is None:
        return
    if not isinstance(src.filters, Mapping):
        raise ValueError(f"data source {src.name!r}: filters must be a mapping field -> {{op: value}}")
    for fld, spec in src.filters.items():
        if not isinstance(fld, str) or not fld:
            raise ValueError(f"data source {src.name!r}: filter field names must be non-empty strings")
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(
                f"data source {src.name!r}: filter on {fld!r} must be a non-empty mapping of {FILTER_OPS}, got {spec!r}"
            )
        bad = sorted(set(spec) - set(FILTER_OPS))
        if bad:
            raise ValueError(f"data source {src.name!r}: filter on {fld!r} has unknown ops {bad}; allowed: {FILTER_OPS}")
        for op in ("min", "max"):
            if op in spec and (isinstance(spec[op], bool) or not isinstance(spec[op], (int, float))):
                raise ValueError(f"data source {src.name!r}: filter {fld}.{op} must be a number, got {spec[op]!r}")
        if "in" in spec and not isinstance(spec["in"], (list, tuple, set)):
            raise ValueError(f"data source {src.name!r}: filter {fld}.in must be a list, got {spec['in']!r}")
        if "min" in spec and "max" in spec and spec["min"] > spec["max"]:
            raise ValueError(f"data source {src.name!r}: filter on {fld!r} has min > max")


def _first_row_local(src: SourceConfig, path: Path) -> dict | None:
    if src.kind == "parquet":  # all columns, so a missing one gets the field error below
        rows: Iterator[dict] = _iter_parquet_file(path, None)
    else:
        rows = _iter_local_rows(src, [path])
    try:
        return next(rows)
    except StopIteration:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"data source {src.name!r}: cannot parse {str(path)!r}: {exc}") from exc
    except Exception as exc:  # pyarrow errors for non-parquet files
        raise ValueError(f"data source {src.name!r}: cannot read {str(path)!r} as {src.kind}: {exc}") from exc


def validate_source(src: SourceConfig, tokenizer=None, *, check_data: bool = True) -> None:
    """Check a source before any work; raise one clear error naming the source.

    Checks: kind, weight/max_tokens, filter spec, text options; for local kinds that every
    path/glob matches files, that no file is empty, and that the first row of each file
    has the text (or messages) field and the filter fields; that a tokenizer with a chat
    template exists when ``messages_field`` is set. Hub sources are checked on their first
    row when read (they cannot be inspected without downloading).
    """
    if not isinstance(src.name, str) or not src.name:
        raise ValueError("every data source needs a non-empty 'name'")
    if src.kind not in KINDS:
        raise ValueError(f"data source {src.name!r}: unknown kind {src.kind!r}; expected one of {KINDS}")
    if src.weight is not None and src.max_tokens is not None:
        raise ValueError(f"data source {src.name!r}: set either 'weight' or 'max_tokens', not both")
    if src.weight is not None and (
        isinstance(src.weight, bool) or not isinstance(src.weight, (int, float))
        or not math.isfinite(src.weight) or src.weight <= 0
    ):
        raise ValueError(f"data source {src.name!r}: weight must be a positive number, got {src.weight!r}")
    if src.max_tokens is not None and (isinstance(src.max_tokens, bool) or not isinstance(src.max_tokens, int)
                                       or src.max_tokens <= 0):
        raise ValueError(f"data source {src.name!r}: max_tokens must be a positive integer, got {src.max_tokens!r}")
    if src.sample_by not in TEXT_SAMPLE_BY:
        raise ValueError(f"data source {src.name!r}: sample_by must be one of {TEXT_SAMPLE_BY}, got {src.sample_by!r}")
    if src.kind == "text" and (src.messages_field or src.text_field != "text"):
        raise ValueError(f"data source {src.name!r}: text files have a single field 'text' (no messages_field)")
    if src.kind == "embedded" and src.messages_field:
        raise ValueError(f"data source {src.name!r}: the embedded corpus has no messages")
    _validate_filters(src)
    for opt in ("message_keys", "role_map"):
        val = getattr(src, opt)
        if val is not None and not isinstance(val, Mapping):
            raise ValueError(f"data source {src.name!r}: {opt} must be a mapping, got {val!r}")
    if src.message_keys and not set(src.message_keys) <= {"role", "content"}:
        raise ValueError(f"data source {src.name!r}: message_keys may only map 'role' and 'content'")
    if src.messages_field and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"data source {src.name!r}: messages_field is set but the tokenizer has no chat_template"
        )
    if src.kind == "hub":
        if not isinstance(src.path, str) or not src.path:
            raise ValueError(f"data source {src.name!r}: a hub source needs 'path' = dataset id")
        return
    if src.kind == "embedded":
        for root in src.paths:
            if not os.path.isdir(os.path.expanduser(root)):
                raise FileNotFoundError(f"data source {src.name!r} (embedded): scan root {root!r} is not a directory")
        return
    files = resolve_files(src)
    if not check_data:
        return
    for path in files:
        if path.stat().st_size == 0:
            raise ValueError(f"data source {src.name!r} ({src.kind}): file {str(path)!r} is empty")
        row = _first_row_local(src, path)
        if row is None:
            raise ValueError(f"data source {src.name!r} ({src.kind}): file {str(path)!r} has no rows")
        if src.kind != "text":
            _check_first_row(src, row, repr(str(path)))


def override_sources(
    sources: Sequence[SourceConfig | Mapping[str, Any]], overrides: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Copy of ``sources`` as dicts with per-source field updates, keyed by source name.

    Handy to point a hub preset at local files of the same schema, e.g.
    ``override_sources(cfg.sources, {"fineweb_edu": {"kind": "parquet", "path": "fw/*.parquet"}})``.
    Unknown source names are an error.
    """
    out = [SourceConfig.from_any(s).to_dict() for s in sources]
    names = [s["name"] for s in out]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"override_sources: no source named {unknown}; sources are {names}")
    for src in out:
        src.update(dict(overrides.get(src["name"], {})))
    return out
