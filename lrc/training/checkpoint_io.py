"""Reading and writing lrc-distill checkpoints: crash-safe writes, safe reads, clear errors.

:class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` every lrc-distill Trainer uses, so
Lightning's own saves (``ModelCheckpoint``, the shutdown callback) and its resume path
(``trainer.fit(ckpt_path=...)``) go through :func:`save_checkpoint` and :func:`load_checkpoint`.
"""

from __future__ import annotations

import re
import secrets
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lrc.io import atomic_write, fsync_dir, stale_temps


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, empty, truncated, corrupt, unsafe or not lrc's."""


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a file beside ``path``, flushed to disk, then renamed onto ``path``: a crash,
    a kill or a full disk leaves the previous checkpoint complete (see :func:`lrc.io.atomic_write`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():  # a sharded checkpoint there (a run resumed from trainer=fsdp): exchange it
            staging = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
            with atomic_write(staging) as fh:
                torch.save(checkpoint, fh)
            _replace_dir(staging, path)
        else:
            with atomic_write(path) as fh:
                torch.save(checkpoint, fh)
    except OSError as err:  # a full disk, a lost mount: the user's to fix, so one line, not a traceback
        raise CheckpointError(
            f"could not write checkpoint {path}: {err.strerror or err}; the previous one is intact"
        ) from None
    for leftover in stale_temps(path):  # of writes killed earlier; the run directory is locked
        _remove(leftover)


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", mmap: bool = False, optimizer: bool = True
) -> dict[str, Any]:
    """Load a checkpoint written by lrc-distill with ``weights_only=True``: tensors and plain values
    only, so a crafted file cannot run code. Raises :class:`CheckpointError` with one clear line for
    a missing, empty, truncated, corrupt or foreign file. A sharded checkpoint (a directory written
    under ``trainer=fsdp``) is read into the same layout, full tensors on the CPU
    (:func:`read_sharded_checkpoint`; ``optimizer=False`` skips reading the optimizer's tensors)."""
    path = Path(path)
    if path.is_dir():
        return read_sharded_checkpoint(path, optimizer=optimizer)
    return load_checkpoint_file(path, map_location=map_location, mmap=mmap)


def load_checkpoint_file(
    path: Path, map_location: Any = "cpu", mmap: bool = False, what: str | None = None, require_lrc: bool = True
) -> dict[str, Any]:
    """:func:`load_checkpoint` of one file (``what`` names it in errors)."""
    what = what or f"checkpoint {path}"
    if not path.is_file():
        raise CheckpointError(f"{what} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what} is empty (0 bytes): the write that made it never finished")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{what} ({size:,} bytes) is not a readable PyTorch checkpoint: it is truncated, "
            f"corrupt or another kind of file"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad file, reported in one line
        text = str(err)
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        if unsafe or "Unsupported global" in text:
            raise CheckpointError(
                f"{what} holds objects other than tensors and plain values"
                + (f" ({unsafe.group(1)})" if unsafe else "")
                + ", so lrc-distill did not write it; it is not loaded, because loading such a file can run code"
            ) from None
        detail = text.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler error:" in text else text
        lines = [line.strip() for line in detail.splitlines() if line.strip()]
        raise CheckpointError(f"{what} ({size:,} bytes) is corrupt: {lines[0] if lines else type(err).__name__}") from None
    if require_lrc and (not isinstance(state, dict) or "lrc" not in state or "state_dict" not in state):
        raise CheckpointError(f"{path} is a PyTorch file but not an lrc-distill checkpoint")
    return state


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` with crash-safe writes and ``weights_only`` reads.

    Lightning's own writer stages the file in ``$TMPDIR`` and moves it into place, which is a copy,
    not an atomic rename, when ``$TMPDIR`` is on another filesystem (a tmpfs ``/tmp``, an NFS home):
    a kill mid-copy leaves a 0-byte or partial ``last.ckpt`` and the previous one is gone.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_checkpoint(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")


# ------------------------------------------------------------------------------------------
# sharded checkpoints (trainer=fsdp): a directory, written by every process
# ------------------------------------------------------------------------------------------
#: The file of a sharded checkpoint that holds everything but tensors (Lightning's name for it).
META_FILE = "meta.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory checkpoint (``trainer=fsdp``): tensors by ``torch.distributed.checkpoint``, the
    rest in ``meta.pt``."""
    return Path(path).is_dir()


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An FQN-keyed optimizer state (``get_optimizer_state_dict``) as its tensors (``{fqn: {key:
    tensor}}``, written sharded) and its parameter groups (plain values, written to ``meta.pt``)."""
    tensors = {fqn: {k: v for k, v in s.items() if torch.is_tensor(v)} for fqn, s in state["state"].items()}
    plain = {fqn: {k: v for k, v in s.items() if not torch.is_tensor(v)} for fqn, s in state["state"].items()}
    if any(plain.values()):
        raise TypeError(f"optimizer state holds non-tensor values {sorted(next(v for v in plain.values() if v))}")
    return tensors, list(state["param_groups"])


def save_sharded_checkpoint(checkpoint: dict[str, Any], path: str | Path, strategy: Any) -> None:
    """Write a sharded checkpoint directory ``path`` from every process of ``strategy`` (all call
    this): the trainable tensors and the optimizer's tensors with ``torch.distributed.checkpoint``
    (each process writes its shards), everything else to ``meta.pt`` (rank 0). Only tensors go
    through ``torch.distributed.checkpoint``, so reading needs no unpickling of objects.

    Crash-safe like :func:`save_checkpoint`: the directory is built beside ``path`` under a hidden
    name, flushed, and exchanged with the previous one in one atomic ``renameat2(RENAME_EXCHANGE)``
    (on file systems without it: two renames, the previous checkpoint kept until the new one is in
    place); the previous one is then deleted."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    token = strategy.broadcast(secrets.token_hex(4))
    staging = path.parent / f".{path.name}.tmp-{token}"
    groups: list[list[dict[str, Any]]] = []
    tensors: dict[str, Any] = {"state_dict": checkpoint.pop("state_dict")}
    for i, opt in enumerate(checkpoint.pop("optimizer_states", [])):
        tensors[f"optimizer_{i}"], g = _split_optimizer(opt)
        groups.append(g)
    checkpoint["optimizer_param_groups"] = groups
    try:
        if strategy.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        strategy.barrier()
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(staging, sync_files=True))
        if strategy.is_global_zero:
            with atomic_write(staging / META_FILE) as fh:
                torch.save(checkpoint, fh)
            _replace_dir(staging, path)
    except OSError as err:
        raise CheckpointError(
            f"could not write checkpoint {path}: {err.strerror or err}; the previous one is intact"
        ) from None
    finally:
        strategy.barrier()
    if strategy.is_global_zero:
        for leftover in stale_temps(path):
            _remove(leftover)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _replace_dir(new: Path, path: Path) -> None:
    """Put directory ``new`` at ``path``, replacing a file or directory there; the old one is
    deleted only once ``new`` is in place."""
    import ctypes
    import os

    fsync_dir(new)
    if not path.exists():
        os.rename(new, path)
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        at_fdcwd, rename_exchange = -100, 2
        exchanged = renameat2 is not None and renameat2(
            at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(path), rename_exchange
        ) == 0
        if not exchanged:  # no RENAME_EXCHANGE here: keep the old one aside until the new one is in place
            aside = new.with_name(new.name + "-old")
            os.rename(path, aside)
            os.rename(new, path)
            new = aside
        _remove(new)  # now the previous checkpoint
    fsync_dir(path.parent)


def _safe_reader(path: Path) -> Any:
    """A ``torch.distributed.checkpoint`` reader for ``path`` whose index (``.metadata``, a pickle)
    is read with an unpickler that builds only the checkpoint library's own records and torch's
    sizes and dtypes, and which refuses entries stored as pickled objects: reading a sharded
    checkpoint runs no code from the file."""
    import io
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            ok = module.startswith("torch.distributed.checkpoint.") or (module, name) in {
                ("torch", "Size"), ("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
            } or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)))
            if not ok:
                raise pickle.UnpicklingError(f"GLOBAL {module}.{name} was not an allowed global")
            return super().find_class(module, name)

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            with open(self._get_metadata_path(rank), "rb") as fh:
                metadata = _Unpickler(io.BytesIO(fh.read())).load()
            objects = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
            if objects:
                raise pickle.UnpicklingError(f"entries stored as pickled objects: {objects[:3]}")
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _read_meta(path: Path) -> dict[str, Any]:
    meta = path / META_FILE
    if not meta.is_file():
        raise CheckpointError(f"checkpoint {path} is a directory without {META_FILE}: not a complete sharded checkpoint")
    state = load_checkpoint_file(meta, what=f"checkpoint {path} ({META_FILE})", require_lrc=False)
    if not isinstance(state, dict) or "lrc" not in state:
        raise CheckpointError(f"{path} is a directory but not an lrc-distill sharded checkpoint")
    return state


def read_sharded_tensors(path: Path, keys: set[str] | None = None) -> dict[str, Any]:
    """The tensors of sharded checkpoint ``path`` as full CPU tensors, nested as written
    (``{"state_dict": {...}, "optimizer_0": {fqn: {...}}}``); ``keys`` limits the read to those
    top-level entries. Runs in one process, with no process group."""
    import pickle

    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    out: dict[str, Any] = {}
    try:
        _load_state_dict(out, storage_reader=_safe_reader(path), planner=_EmptyStateDictLoadPlanner(keys=keys),
                         no_dist=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values ({err}), so lrc-distill did not "
            f"write it; it is not loaded, because loading such a file can run code"
        ) from None
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - a missing or truncated shard: one line
        text = " ".join(str(err).split())
        if "allowed global" in text or "pickled objects" in text:
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain values, so lrc-distill did not "
                f"write it; it is not loaded, because loading such a file can run code"
            ) from None
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: {text[:300]}") from None
    return out


def _fqn_optimizer(tensors: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {"state": {fqn: dict(s) for fqn, s in tensors.items()}, "param_groups": [dict(g) for g in groups]}


def _id_keyed(optimizer: dict[str, Any]) -> dict[str, Any]:
    """An FQN-keyed optimizer state as ``torch.optim.Optimizer.state_dict()`` lays it out: parameters
    numbered in the order of the groups' ``params``."""
    index: dict[str, int] = {}
    groups = []
    for g in optimizer["param_groups"]:
        ids = [index.setdefault(fqn, len(index)) for fqn in g["params"]]
        groups.append({**g, "params": ids})
    return {"state": {index[fqn]: s for fqn, s in optimizer["state"].items()}, "param_groups": groups}


def read_sharded_checkpoint(path: str | Path, optimizer: bool = True) -> dict[str, Any]:
    """A sharded checkpoint read into the layout of a one-file checkpoint (full tensors, an
    optimizer state numbered like ``Optimizer.state_dict()``), for a resume on one process or under
    ``trainer=ddp`` and for lrc-export (``optimizer=False``: the trainable tensors only)."""
    path = Path(path)
    state = _read_meta(path)
    groups = state.pop("optimizer_param_groups", [])
    tensors = read_sharded_tensors(path, None if optimizer else {"state_dict"})
    state["state_dict"] = tensors.get("state_dict", {})
    if optimizer:
        state["optimizer_states"] = [
            _id_keyed(_fqn_optimizer(tensors.get(f"optimizer_{i}", {}), g)) for i, g in enumerate(groups)
        ]
    return state


def load_into_sharded(path: str | Path, module: Any, optimizers: list[Any]) -> dict[str, Any]:
    """Resume a sharded (FSDP2) ``module`` and its ``optimizers`` from ``path``, on every process: a
    sharded checkpoint of any number of processes (each reads the slices of its own shards), or a
    one-file checkpoint (each cuts its shards from the full tensors). Returns the rest of the
    checkpoint for Lightning (step, schedules, loops, data position), with ``state_dict`` holding
    the loaded trainable tensors for the module's ``on_load_checkpoint`` checks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = Path(path)
    own = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    targets: dict[str, Any] = {"state_dict": own}
    opt_states = [get_optimizer_state_dict(module, opt) for opt in optimizers]
    for i, s in enumerate(opt_states):
        targets[f"optimizer_{i}"] = s["state"]
    if is_sharded_checkpoint(path):
        state = _read_meta(path)
        groups = state.pop("optimizer_param_groups", [])
        _check_sharded_keys(path, targets)
        dcp.load(targets, storage_reader=_safe_reader(path))
    else:
        state = load_checkpoint(path)
        _fill_from_full(own, state["state_dict"])
        groups = []
        for opt, s, saved in zip(optimizers, opt_states, state.pop("optimizer_states", [])):
            named = _fqn_optimizer_from_ids(saved, opt, module)
            for fqn, values in named["state"].items():
                _fill_from_full(s["state"][fqn], values)
            groups.append(named["param_groups"])
    for i, (opt, s) in enumerate(zip(optimizers, opt_states)):
        saved_groups = groups[i] if i < len(groups) else s["param_groups"]
        set_optimizer_state_dict(module, opt, {"state": s["state"], "param_groups": saved_groups})
    state["state_dict"] = own
    return state


def _check_sharded_keys(path: Path, targets: dict[str, Any]) -> None:
    """Name the trainable tensors a sharded checkpoint lacks (instead of the reader's assertion)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = _safe_reader(path).read_metadata().state_dict_metadata
    missing = [f"state_dict.{k}" for k in targets["state_dict"] if f"state_dict.{k}" not in index]
    wrong = [f"{k}: checkpoint {tuple(index[f'state_dict.{k}'].size)}, this student {tuple(v.shape)}"
             for k, v in targets["state_dict"].items()
             if isinstance(index.get(f"state_dict.{k}"), TensorStorageMetadata)
             and tuple(index[f"state_dict.{k}"].size) != tuple(v.shape)]
    if missing or wrong:
        raise ValueError(
            f"the checkpoint does not fit this student ({len(missing) + len(wrong)} tensor(s): "
            f"{'; '.join((wrong + missing)[:3])}); use the student settings it was written with"
        )


def _fqn_optimizer_from_ids(saved: dict[str, Any], optimizer: Any, module: Any) -> dict[str, Any]:
    """A one-file checkpoint's optimizer state (parameters numbered across the groups in order)
    keyed by the names of ``optimizer``'s parameters in ``module``."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise ValueError(f"the checkpoint's optimizer holds {len(ids)} tensors, this run's {len(names)}")
    fqn = dict(zip(ids, names))
    return {
        "state": {fqn[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def _fill_from_full(targets: dict[str, Any], full: dict[str, Any]) -> None:
    """Copy the full tensors ``full`` into ``targets`` (this process's shards of DTensors, each cut
    from its own full copy, no communication; plain tensors whole)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    missing = sorted(set(targets) - set(full))
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[:3]}")
    with torch.no_grad():
        for k, t in targets.items():
            src = full[k]
            if isinstance(t, DTensor):
                piece = distribute_tensor(src.to(t.dtype), t.device_mesh, t.placements, src_data_rank=None)
                t.to_local().copy_(piece.to_local())
            elif torch.is_tensor(t):
                t.copy_(src)
