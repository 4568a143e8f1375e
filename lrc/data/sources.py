"""Data sources: what to read, how to turn a row into training text, and checks up front.

A :class:`SourceConfig` names one source of documents:

* ``hub``: a Hugging Face dataset id, read with
  ``datasets.load_dataset(path, name=config_name, split=split, streaming=streaming)``;
* ``jsonl`` / ``parquet`` / ``text``: local files (a path, a glob, or a list of them),
  read with plain readers (``json``, ``pyarrow.parquet``, ``open``) that stream row by
  row and leave no cache behind;
* ``embedded``: the offline corpus of :mod:`lrc.data.corpus` (docstrings of the
  installed packages), with its own held-out ``validation`` split.
* ``chatterbot``: the human-written English dialogues of the ``chatterbot-corpus`` package
  (BSD, installed with lrc), read from its YAML files where the package is installed; one row
  per dialogue, ``{"messages": [{"role": "user" | "assistant", "content"}], "category"}``, the
  utterances alternating user / assistant. ``path`` names its language folders (default
  ``english``).

A row becomes a document either through ``text_field`` (dotted paths such as
``metadata.text`` reach into nested dicts) or, when ``messages_field`` is set, by
rendering its list of messages with the tokenizer's chat template
(``apply_chat_template(messages, tokenize=False)``) and training on that text.
``message_keys``/``role_map`` adapt other message schemas, e.g. ShareGPT
(``{"from": "human", "value": ...}``, see :data:`SHAREGPT`).

:func:`validate_source` checks a source before any work and raises one clear
``ValueError``/``FileNotFoundError`` naming the source and the problem. A bad row met
later (invalid JSON or UTF-8, a missing or malformed field) raises one ``ValueError``
naming the source, the file and line (JSON lines, text), element (a JSON array) or row
(parquet, hub), and the field.
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
    "RowError",
    "SHAREGPT",
    "SourceConfig",
    "apply_filters",
    "chatterbot_files",
    "get_field",
    "iter_documents",
    "iter_located_rows",
    "normalize_messages",
    "override_sources",
    "render_messages",
    "resolve_files",
    "row_to_text",
    "validate_source",
]

KINDS = ("hub", "jsonl", "parquet", "text", "embedded", "chatterbot")
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
        kind: one of ``hub``, ``jsonl``, ``parquet``, ``text``, ``embedded``, ``chatterbot``.
        path: hub dataset id; or a local file, glob, or list of files/globs; for
            ``embedded`` optionally a list of directories to scan instead of the install; for
            ``chatterbot`` the language folders of the package (default ``english``).
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
        unique_tokens: declared, not measured: distinct tokens this source offers the run (e.g.
            the paper's 10B of Fineweb-Edu). lrc-distill refuses a run whose planned tokens exceed
            ``max_data_epochs`` times the sum over the sources, when every source declares it.
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
    unique_tokens: int | None = None
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


class RowError(ValueError):
    """A problem with one row (bad bytes, bad JSON, a missing or malformed field).

    ``where`` is the row's place (``"<file>, line 101"``, ``"<file>, row 101"``) when the
    reader knows it; :func:`iter_located_rows` and :func:`iter_documents` add the source
    name and the place to the message.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


def _located(src: SourceConfig, err: RowError, where: str | None = None) -> ValueError:
    return ValueError(f"data source {src.name!r}: {err.where or where}: {err}")


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


def _passes(value: Any, spec: Mapping[str, Any]) -> bool:
    if "min" in spec and not value >= spec["min"]:
        return False
    if "max" in spec and not value <= spec["max"]:
        return False
    if "equals" in spec and value != spec["equals"]:
        return False
    return not ("in" in spec and value not in spec["in"])


def apply_filters(row: Mapping[str, Any], filters: Mapping[str, Mapping[str, Any]] | None) -> bool:
    """True when the row passes every filter (a missing or null field fails).

    A value that cannot be compared with the filter (a string against ``min: 4``) raises
    :class:`RowError` naming the field.
    """
    if not filters:
        return True
    for fld, spec in filters.items():
        try:
            value = get_field(row, fld)
        except KeyError:
            return False
        if value is None:
            return False
        try:
            if not _passes(value, spec):
                return False
        except TypeError:
            raise RowError(f"filter field {fld!r} holds {value!r:.80}, which cannot be compared with {dict(spec)}") from None
    return True


def normalize_messages(messages: Any, src: SourceConfig) -> list[dict[str, str]]:
    """Map a row's messages to ``[{"role", "content"}]`` using ``message_keys``/``role_map``.

    Raises :class:`RowError` naming the field when the messages have another shape.
    """
    fld = src.messages_field
    if isinstance(messages, str):  # some datasets store the conversation as a JSON string
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise RowError(f"messages_field {fld!r} holds a string that is not JSON ({exc.msg})") from None
    if not isinstance(messages, (list, tuple)):
        raise RowError(f"messages_field {fld!r} must hold a list of messages, got {type(messages).__name__}")
    keys = {"role": "role", "content": "content", **(src.message_keys or {})}
    roles = src.role_map or {}
    out = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, Mapping) or keys["role"] not in m or keys["content"] not in m:
            raise RowError(
                f"message {n} of messages_field {fld!r} needs keys {keys['role']!r} and {keys['content']!r} "
                f"(set message_keys for other schemas); got {m!r:.200}"
            )
        role = m[keys["role"]]
        out.append({"role": roles.get(role, role), "content": m[keys["content"]] or ""})
    return out


def render_messages(messages: list[dict[str, str]], tokenizer) -> str:
    """The chat-template text of a conversation (no tokenization, no generation prompt)."""
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _field_names(row: Any) -> Any:
    return sorted(row) if isinstance(row, Mapping) else f"none (the row is a {type(row).__name__})"


def _require_field(row: Mapping[str, Any], src: SourceConfig) -> Any:
    fld = src.messages_field or src.text_field
    try:
        return get_field(row, fld)
    except KeyError:
        kind = "messages_field" if src.messages_field else "text_field"
        raise RowError(f"{kind} {fld!r} not found; available fields: {_field_names(row)}") from None


def row_to_text(row: Mapping[str, Any], src: SourceConfig, tokenizer=None) -> str:
    """The training text of one row: ``text_field``, or rendered ``messages_field``.

    A null text is ``""`` (the row is skipped); a missing field, a text that is not a string
    or messages of the wrong shape raise :class:`RowError` naming the field.
    """
    if src.messages_field and tokenizer is None:
        raise ValueError(f"data source {src.name!r}: rendering messages needs a tokenizer")
    value = _require_field(row, src)
    if src.messages_field:
        messages = normalize_messages(value, src)
        try:
            return render_messages(messages, tokenizer)
        except Exception as exc:  # jinja errors of the template (roles that do not alternate, ...)
            raise RowError(f"the chat template failed on messages_field {src.messages_field!r}: {exc}") from None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"text_field {src.text_field!r} must hold a string, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- readers
#
# Every reader yields ``(place, row)``: the place names the file and the line (JSON lines,
# text), the element (a JSON array) or the row (parquet, hub), so that an error in row 101
# says where it is. Files are read as bytes and decoded line by line, which pins a bad
# UTF-8 byte to its line.


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


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode(raw: bytes, path: Path, line: int) -> str:
    """UTF-8 text of ``raw``, whose first byte is on ``line`` of ``path``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = line + raw.count(b"\n", 0, exc.start)
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RowError(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column})",
                       f"{path}, line {bad_line}") from None


def _parse_json(text: str, where: str, line_offset: int = 0) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if line_offset:  # a multi-line document: name the line of the error
            where = where.rsplit(", line", 1)[0] + f", line {line_offset + exc.lineno - 1}"
        raise RowError(f"invalid JSON ({exc.msg}: column {exc.colno})", where) from None


def _iter_json_file(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a JSON-lines file, or of a file holding one JSON array of objects."""
    with _open_binary(path) as fh:
        first = True
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}, line {lineno}"
            if first and raw.lstrip().startswith(b"["):  # a JSON array of objects
                data = raw + fh.read()
                rows = _parse_json(_decode(data, path, lineno), where, line_offset=lineno)
                for k, row in enumerate(rows, 1):
                    yield f"{path}, element {k}", row
                return
            first = False
            yield where, _parse_json(_decode(raw.rstrip(b"\r\n"), path, lineno), where)


def _iter_parquet_file(path: Path, columns: list[str] | None) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    try:
        pf = pq.ParquetFile(path)
        if columns is not None and not set(columns) <= set(pf.schema_arrow.names):
            columns = None  # read everything: the field check then lists what the file has
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                n += 1
                yield f"{path}, row {n}", row
    except (pa.ArrowException, OSError) as exc:
        raise RowError(f"cannot read as parquet: {exc}", f"{path}, row {n + 1}" if n else str(path)) from None


def _iter_text_file(path: Path, sample_by: str) -> Iterator[tuple[str, dict]]:
    if sample_by == "line":
        with _open_binary(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                line = _decode(raw, path, lineno).rstrip("\r\n")
                if line.strip():
                    yield f"{path}, line {lineno}", {"text": line}
        return
    with _open_binary(path) as fh:
        content = _decode(fh.read(), path, 1).replace("\r\n", "\n").replace("\r", "\n")
    if sample_by == "document":
        if content.strip():
            yield str(path), {"text": content}
        return
    para: list[str] = []
    start = 0
    for lineno, line in enumerate(content.splitlines(), 1):
        if line.strip():
            start = start if para else lineno
            para.append(line)
        elif para:
            yield f"{path}, line {start}", {"text": "\n".join(para)}
            para = []
    if para:
        yield f"{path}, line {start}", {"text": "\n".join(para)}


def _needed_columns(src: SourceConfig) -> list[str]:
    cols = {(src.messages_field or src.text_field).split(".")[0]}
    cols.update(f.split(".")[0] for f in (src.filters or {}))
    return sorted(cols)


def _iter_local_rows(src: SourceConfig, files: Sequence[Path]) -> Iterator[tuple[str, Any]]:
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


def chatterbot_files(src: SourceConfig) -> list[Path]:
    """The YAML files of the ``chatterbot-corpus`` package for the source's languages, sorted."""
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"data source {src.name!r} (chatterbot): the chatterbot-corpus package is not installed "
            f"(pip install chatterbot-corpus)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = []
    for language in src.paths or ["english"]:
        found = sorted((root / language).glob("*.yml"))
        if not found:
            known = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"data source {src.name!r} (chatterbot): no language {language!r} in chatterbot-corpus; it has {known}"
            )
        files.extend(found)
    return files


def _iter_chatterbot(files: Sequence[Path]) -> Iterator[tuple[str, Any]]:
    import yaml

    for path in files:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for n, dialogue in enumerate(data.get("conversations") or [], 1):
            turns = [{"role": "user" if k % 2 == 0 else "assistant", "content": str(text)}
                     for k, text in enumerate(dialogue or [])]
            yield f"{path}, conversation {n}", {"messages": turns, "category": path.stem}


def _check_first_row(src: SourceConfig, row: Any) -> None:
    """The text (or messages) field and every filter field exist (a typo would drop every row)."""
    if not isinstance(row, Mapping):
        raise RowError(f"expected an object with fields, got {type(row).__name__}")
    value = _require_field(row, src)
    if src.messages_field:
        normalize_messages(value, src)
    for fld in src.filters or {}:
        if not _has_field(row, fld):
            raise RowError(f"filter field {fld!r} not found; available fields: {_field_names(row)}")


def _raw_rows(src: SourceConfig, split: str, cache_dir) -> Iterator[tuple[str, Any]]:
    if src.kind in LOCAL_KINDS:
        return _iter_local_rows(src, resolve_files(src))
    if src.kind == "embedded":
        corpus = _embedded_files(src, cache_dir)
        return _iter_json_file(corpus.split("validation" if split == "validation" else "train"))
    if src.kind == "chatterbot":
        return _iter_chatterbot(chatterbot_files(src))
    if src.kind == "hub":
        where = f"hub dataset {src.path!r} ({src.config_name}, {split})"
        return ((f"{where}, row {n}", row) for n, row in enumerate(_load_hub(src, split), 1))
    raise ValueError(f"data source {src.name!r}: unknown kind {src.kind!r}; expected one of {KINDS}")


def iter_located_rows(
    src: SourceConfig,
    split: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    apply_row_filters: bool = True,
) -> Iterator[tuple[str, dict]]:
    """``(place, row)`` of the rows of ``src`` (after its filters), in a deterministic order.

    ``split`` defaults to ``src.split``; for ``embedded`` it is ``train`` or ``validation``.
    The first row is checked for the text/messages/filter fields. Any bad row raises one
    ``ValueError`` naming the source, the file and line (or row) and the field.
    """
    rows = _raw_rows(src, split or src.split, cache_dir)
    first = True
    while True:
        try:
            item = next(rows, None)
        except RowError as err:  # bad bytes or JSON: the reader knows the place
            raise _located(src, err) from None
        if item is None:
            return
        where, row = item
        try:
            if first:
                _check_first_row(src, row)
            elif not isinstance(row, Mapping):
                raise RowError(f"expected an object with fields, got {type(row).__name__}")
            keep = not apply_row_filters or apply_filters(row, src.filters)
        except RowError as err:
            raise _located(src, err, where) from None
        first = False
        if keep:
            yield where, row


def iter_documents(
    src: SourceConfig,
    tokenizer=None,
    split: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Training texts of ``src`` (filtered rows, messages rendered), skipping empty ones.

    A row whose field is missing or malformed raises one ``ValueError`` naming the source,
    the file and line (or row) and the field.
    """
    for where, row in iter_located_rows(src, split, cache_dir=cache_dir):
        try:
            text = row_to_text(row, src, tokenizer)
        except RowError as err:
            raise _located(src, err, where) from None
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


def _first_row_local(src: SourceConfig, path: Path) -> tuple[str, Any] | None:
    # parquet: all columns, so a missing one gets the field error that lists the others
    rows = _iter_parquet_file(path, None) if src.kind == "parquet" else _iter_local_rows(src, [path])
    try:
        return next(rows, None)
    except RowError as err:
        raise _located(src, err) from None


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
    if src.unique_tokens is not None and (isinstance(src.unique_tokens, bool) or not isinstance(src.unique_tokens, int)
                                          or src.unique_tokens <= 0):
        raise ValueError(f"data source {src.name!r}: unique_tokens must be a positive integer, got {src.unique_tokens!r}")
    if src.sample_by not in TEXT_SAMPLE_BY:
        raise ValueError(f"data source {src.name!r}: sample_by must be one of {TEXT_SAMPLE_BY}, got {src.sample_by!r}")
    if src.kind == "text" and (src.messages_field or src.text_field != "text"):
        raise ValueError(f"data source {src.name!r}: text files have a single field 'text' (no messages_field)")
    if src.kind == "embedded" and src.messages_field:
        raise ValueError(f"data source {src.name!r}: the embedded corpus has no messages")
    if src.val_split is not None and src.kind != "hub":  # local files have no splits: it would be the training data
        raise ValueError(
            f"data source {src.name!r} ({src.kind}): val_split names a hub split; a {src.kind} source has none "
            f"(it would validate on the training files): hold out with val_fraction or val_tokens instead"
        )
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
    if src.kind == "chatterbot":
        chatterbot_files(src)
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
        first = _first_row_local(src, path)
        if first is None:
            raise ValueError(f"data source {src.name!r} ({src.kind}): file {str(path)!r} has no rows")
        if src.kind != "text":
            try:
                _check_first_row(src, first[1])
            except RowError as err:
                raise _located(src, err, first[0]) from None


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
