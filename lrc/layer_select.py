"""Layer selection that works for any teacher: one spec, resolved against a layer count.

A *layer spec* names some of ``n`` layers without knowing ``n`` in advance:

- ``None``: all ``n`` layers;
- a list of indices, python-style (``-1`` is the last layer), e.g. ``[0, 2, -1]``;
- ``{"every": k}`` (optionally ``"offset": o``): layers ``o, o + k, o + 2k, ...`` (``o`` defaults to 0);
- ``{"first": k}`` / ``{"last": k}``: the first / last ``k`` layers;
- ``{"fraction": f}`` with ``0 < f <= 1``: ``m = max(1, floor(f * n + 1/2))`` layers (``f * n``
  rounded half up, at least one), spread evenly: ``floor(j * n / m)`` for ``j = 0 .. m - 1``, so the
  first layer is always in and the gaps differ by at most one (``{"fraction": 0.5}`` of 30 layers is
  ``0, 2, ..., 28``).

:func:`select_layers` resolves a spec to sorted, distinct indices in ``[0, n)``; :func:`check_layer_spec`
checks its form alone (for configs read before the layer count is known). Both raise ``ValueError``
naming the config key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

LayerSpec = Union[None, Sequence[int], Mapping[str, Any]]

PATTERNS = ("every", "first", "last", "fraction")
_FORMS = "null (all), a list of indices, {every: k[, offset: o]}, {first: k}, {last: k} or {fraction: f}"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_layer_spec(spec: LayerSpec, key: str = "layers") -> None:
    """Raise ``ValueError`` naming ``key`` if ``spec`` is not one of the accepted forms (values that
    need the layer count, such as an index out of range, are checked by :func:`select_layers`)."""
    if spec is None:
        return
    if isinstance(spec, Mapping):
        names = [k for k in spec if k in PATTERNS]
        unknown = sorted(str(k) for k in spec if k not in (*PATTERNS, "offset"))
        if unknown or len(names) != 1:
            raise ValueError(
                f"{key} must be {_FORMS}; got {dict(spec)!r}"
                + (f" (unknown keys {unknown})" if unknown else " (give exactly one of every, first, last, fraction)")
            )
        (name,) = names
        value = spec[name]
        if "offset" in spec and name != "every":
            raise ValueError(f"{key}.offset only goes with {key}.every, got {dict(spec)!r}")
        if name == "fraction":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{key}.fraction must be a number in (0, 1], got {value!r}")
        elif not _is_int(value) or value < 1:
            raise ValueError(f"{key}.{name} must be an integer >= 1, got {value!r}")
        offset = spec.get("offset", 0)
        if not _is_int(offset) or offset < 0:
            raise ValueError(f"{key}.offset must be an integer >= 0, got {offset!r}")
        return
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ValueError(f"{key} must be {_FORMS}; got {spec!r}")
    if len(spec) == 0:
        raise ValueError(f"{key} is empty; give at least one layer index, or null for all layers")
    bad = [i for i in spec if not _is_int(i)]
    if bad:
        raise ValueError(f"{key} must hold integer layer indices, got {bad}")
    dups = sorted({i for i in spec if list(spec).count(i) > 1})
    if dups:
        raise ValueError(f"{key} has duplicated indices: {dups}")


def select_layers(spec: LayerSpec, num_layers: int, key: str = "layers") -> list[int]:
    """The sorted, distinct indices in ``[0, num_layers)`` that ``spec`` names (see the module doc)."""
    n = int(num_layers)
    if n < 1:
        raise ValueError(f"{key}: there are no layers to select from (num_layers={num_layers!r})")
    check_layer_spec(spec, key)
    if spec is None:
        return list(range(n))
    if isinstance(spec, Mapping):
        return _pattern(spec, n, key)
    bad = [i for i in spec if not -n <= i < n]
    if bad:
        raise ValueError(f"{key} has indices out of range [-{n}, {n - 1}] ({n} layers): {bad}")
    layers = [i % n for i in spec]
    dups = sorted({i for i in layers if layers.count(i) > 1})
    if dups:
        raise ValueError(f"{key} has duplicated indices (negative ones counted from the end): {dups}")
    return sorted(layers)


def _pattern(spec: Mapping[str, Any], n: int, key: str) -> list[int]:
    if "every" in spec:
        k, offset = spec["every"], spec.get("offset", 0)
        if offset >= n:
            raise ValueError(f"{key}.offset must be below the {n} layers, got {offset}")
        return list(range(offset, n, k))
    if "fraction" in spec:
        m = max(1, int(round(spec["fraction"] * n, 9) + 0.5))  # round half up; round(., 9) drops float noise
        return [j * n // m for j in range(m)]
    name = "first" if "first" in spec else "last"
    k = spec[name]
    if k > n:
        raise ValueError(f"{key}.{name} must be at most the {n} layers, got {k}")
    return list(range(k)) if name == "first" else list(range(n - k, n))


def plain_layer_spec(spec: LayerSpec) -> Any:
    """``spec`` as plain data (``None``, a list or a dict), e.g. for a saved config."""
    if spec is None:
        return None
    return dict(spec) if isinstance(spec, Mapping) else list(spec)
