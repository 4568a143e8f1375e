"""Up-front checks of a composed lrc-distill config: every key is one the code reads, and every
plain number is a number. Hydra lets ``+key=value`` add anything, and a misspelt key would otherwise
be ignored without a word (``+optim.lrr=0.1``) or fail deep inside a constructor.

What a key may be, by node:

* ``method``: ``_target_`` must name a :class:`~lrc.training.module.DistillModule` subclass (the
  active method); its other keys are that class's ``method_options()`` (``name`` and what its own
  ``__init__`` adds);
* a node with ``_target_`` (trainer, data, callbacks, loggers): a parameter of the target's
  signature (anything, when it takes ``**kwargs``); scalars are checked against the annotation;
* ``student``, ``loss``, ``optim``, ``teacher``: a field of :class:`CloneConfig`, of the active
  method's ``loss_config`` (:class:`LossConfig` for lrc), a key of :data:`OPTIM_DEFAULTS` and a
  parameter of :func:`load_teacher`;
* every other node (the top level, ``log``, ``export``, ``paths`` ...): a key of ``distill.yaml`` or of
  one of the group's files; where that file's value is a number or a boolean, so must the value be.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from lrc.cli.common import ConfigError

HYDRA_KEYS = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}
OPEN_NODES = {"callbacks"}  # dicts of named objects: new names are allowed (each must be a _target_ node)
SKIP = {"hydra"}


def check_config(cfg: DictConfig, conf_dir: Path, config_name: str = "distill") -> None:
    """Raise :class:`ConfigError` for the first unknown key or mistyped scalar, naming the key
    (``config_name``: the primary config the run composed, ``distill`` or ``sft``)."""
    reference = reference_tree(str(conf_dir), config_name)
    # resolved at the first node that needs it (importing the method imports Lightning)
    method = cache(lambda: _method(cfg))

    for path, node in _nodes(cfg, ""):
        allowed, types_ = _schema(path, node, reference, method)
        for key in node.keys():
            key = str(key)
            full = f"{path}.{key}" if path else key
            if path == "" and key in SKIP:
                continue
            if path in OPEN_NODES:
                child = node.get(key)
                if child is not None and not (isinstance(child, DictConfig) and "_target_" in child):
                    raise ConfigError(f"{full} must be a config with a _target_ (a callback class) or null, got {child!r}")
                continue
            if allowed is not None and key not in allowed and key not in HYDRA_KEYS:
                note = f"; method {method().default_name or method().__name__} reads {', '.join(sorted(allowed))}" \
                    if path in ("loss", "method") else ""
                raise ConfigError(f"unknown key {full}{_did_you_mean(key, allowed, path)}{note}")
            if key in types_:
                _check_scalar(full, _value(node, key), types_[key])


def _nodes(node: Any, path: str) -> Iterator[tuple[str, DictConfig]]:
    """Every dict node of the config (lists of nodes included, as ``logger.0``), outermost first."""
    if isinstance(node, DictConfig):
        if path.split(".")[0] in SKIP:
            return
        yield path, node
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)) and not _opaque(path, str(key), node):
                yield from _nodes(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig) and path.split(".")[0] == "logger":
        for i, child in enumerate(node):
            if isinstance(child, DictConfig):
                yield from _nodes(child, f"{path}.{i}")


def _opaque(path: str, key: str, node: DictConfig) -> bool:
    """Values the constructor validates itself: any dict or list under a ``_target_`` node (data
    sources, ...), the student's free-form ``extra``, the teacher's ``tiny`` sizes, term weights."""
    full = f"{path}.{key}" if path else key
    return "_target_" in node or full in {"student.extra", "teacher.tiny", "loss.term_weights"}


def _value(node: DictConfig, key: str) -> Any:
    try:
        return node[key]
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve is not ours to judge
        return None


def _did_you_mean(key: str, allowed: set[str], path: str) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    prefix = f"{path}." if path else ""
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


# ----------------------------------------------------------------------------- schemas
def _method(cfg: DictConfig) -> type:
    """The active method's class (``method._target_``; lrc when the config has no ``method``)."""
    from lrc.training.module import method_class

    try:
        return method_class(OmegaConf.select(cfg, "method._target_", default=None))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _schema(
    path: str, node: DictConfig, reference: dict[str, Any], method: Callable[[], type]
) -> tuple[set[str] | None, dict[str, Any]]:
    """``(allowed keys or None for any, {key: expected type})`` for the node at ``path``
    (``method()``: the active method's class)."""
    if path == "method":
        options = method().method_options()
        return set(options), options
    if "_target_" in node:
        return _signature_schema(str(node["_target_"]))
    if path == "loss":
        return _dataclass_schema(method().loss_config)
    if path in ("student", "optim", "teacher"):
        return _code_schema(path)
    if path in OPEN_NODES:
        return None, {}
    ref = _lookup(reference, path)
    if ref is None:
        return None, {}
    # a file's integer default may stand for any number (max_data_epochs: 1 takes 1.5)
    return set(ref), {k: float if type(v) is int else type(v) for k, v in ref.items() if isinstance(v, (bool, int, float))}


def _lookup(reference: dict[str, Any], path: str) -> dict[str, Any] | None:
    node: Any = reference
    for part in path.split(".") if path else []:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, dict) else None


@lru_cache(maxsize=None)
def reference_tree(conf_dir: str, config_name: str = "distill") -> dict[str, Any]:
    """The keys the config files define: ``<config_name>.yaml`` (without its defaults list) and, for
    each group without a ``_target_``, the union of the keys of its options."""
    conf = Path(conf_dir)
    base = OmegaConf.to_container(OmegaConf.load(conf / f"{config_name}.yaml"), resolve=False)
    defaults = base.pop("defaults", [])
    base.pop("hydra", None)
    for entry in defaults:
        if not isinstance(entry, dict):
            continue
        for group in entry:
            group = str(group).split("@")[0].split(" ")[-1].lstrip("/")
            if "/" in group or group in base:
                continue
            base[group] = _group_keys(conf / group)
    return base


def _group_keys(folder: Path) -> dict[str, Any] | None:
    """Union of the top-level keys of a group's option files; ``None`` (anything goes) for groups
    whose options are lists, ``_global_`` packages or ``_target_`` nodes."""
    merged: dict[str, Any] = {}
    for file in sorted(folder.glob("*.yaml")):
        text = file.read_text()
        if "@package _global_" in text:
            return None
        data = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
        if not isinstance(data, dict) or "_target_" in data:
            return None
        data.pop("defaults", None)
        for k, v in data.items():
            merged.setdefault(k, v)
    return merged


@lru_cache(maxsize=None)
def _signature_schema(target: str) -> tuple[set[str] | None, dict[str, Any]]:
    from hydra._internal.utils import _locate

    try:
        obj = _locate(target)
    except Exception:  # noqa: BLE001 - instantiation will report a bad _target_ itself
        return None, {}
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, {}
    params = [p for p in sig.parameters.values() if p.name != "self"]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None, {}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check names only
        hints = {}
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL,)}
    return names, {n: hints[n] for n in names if n in hints}


@lru_cache(maxsize=None)
def _code_schema(section: str) -> tuple[set[str], dict[str, Any]]:
    if section == "optim":
        from lrc.training.module import OPTIM_DEFAULTS

        return set(OPTIM_DEFAULTS), {}
    if section == "teacher":
        from lrc.teachers import load_teacher

        return _signature_schema(f"{load_teacher.__module__}.{load_teacher.__name__}")  # type: ignore[return-value]
    from lrc.model import CloneConfig

    return _dataclass_schema(CloneConfig)


@lru_cache(maxsize=None)
def _dataclass_schema(cls: type) -> tuple[set[str], dict[str, Any]]:
    return {f.name for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)


# ------------------------------------------------------------------------------ scalars
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}  # str: never checked


def _check_scalar(key: str, value: Any, expected: Any) -> None:
    """``expected`` is an annotation or the type of a file's default; only bool, int and float
    (optionally None) are checked: a string takes any scalar, anything richer is left to the code."""
    kinds = _scalar_kinds(expected)
    if kinds is None or value is None and type(None) in kinds:
        return
    if value is None or isinstance(value, (dict, list, DictConfig, ListConfig)):
        if value is None:
            raise ConfigError(f"{key} must be {_describe(kinds)}, got null")
        return  # a node where a scalar was expected: the constructor says more
    ok = any(
        (k is bool and isinstance(value, bool))
        or (k is int and isinstance(value, int) and not isinstance(value, bool))
        or (k is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (k is str and isinstance(value, str))
        for k in kinds
    )
    if not ok:
        raise ConfigError(f"{key} must be {_describe(kinds)}, got {value!r}")


def _scalar_kinds(expected: Any) -> set[type] | None:
    if expected is str:
        return None
    if expected in _KINDS:
        return {expected}
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        kinds: set[type] = set()
        for arg in typing.get_args(expected):
            if arg is type(None):
                kinds.add(arg)
            elif arg in _KINDS and arg is not str:
                kinds.add(arg)
            else:
                return None
        return kinds
    return None


def _describe(kinds: set[type]) -> str:
    words = [_KINDS[k] for k in (int, float, bool) if k in kinds]
    text = " or ".join(words)
    return text + (" or null" if type(None) in kinds else "")
