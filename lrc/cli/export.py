"""``lrc-export ckpt=PATH out=DIR [dtype=bfloat16] [overwrite=true]``

Writes the plain transformers student from a distillation checkpoint alone, whatever the method:
the checkpoint records the method's class and holds the resolved config (teacher source, student,
loss), so no training flag is repeated.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from lrc.cli.common import ConfigError


@dataclass
class ExportArgs:
    ckpt: str = "???"  # a .ckpt written by lrc-distill (e.g. runs/lrc/<run>/checkpoints/last.ckpt)
    out: str = "???"  # directory for the plain transformers model
    dtype: str | None = None  # float32 | bfloat16 | float16; None = the training dtype
    overwrite: bool = False  # replace a non-empty ``out``


DTYPES = (None, "float32", "bfloat16", "float16")


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Rebuild the method of ``ckpt`` (the class it records, a :class:`DistillModule` subclass; lrc
    for checkpoints that name none) and write its student to ``out``. Every argument is checked, and
    the checkpoint read safely (:func:`lrc.training.checkpoint_io.load_checkpoint`), before the
    teacher is loaded; a checkpoint with a NaN / Inf tensor is refused."""
    import torch

    from lrc.training.checkpoint_io import load_checkpoint
    from lrc.training.module import method_class

    ckpt, out = Path(ckpt), Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(d for d in DTYPES if d)} (or omitted), got {dtype!r}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a directory for the exported model")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass overwrite=true to replace it")
    parent = next(p for p in out.absolute().parents if p.exists())  # the export is built beside `out`
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write {out}: {parent} is not writable")
    state = load_checkpoint(ckpt, optimizer=False)  # a sharded one: its trainable tensors only, gathered here
    if "hyper_parameters" not in state:
        raise ConfigError(f"{ckpt} is not an lrc-distill checkpoint (no hyper_parameters)")
    try:
        cls = method_class((state.get("lrc") or {}).get("method_target"))
    except ValueError as err:
        raise ConfigError(f"{ckpt} was not written by a method lrc can rebuild: {err}") from None
    module = rebuild_method(cls, state["hyper_parameters"], state["state_dict"], checkpoint=state)
    return module.save_student(out, dtype=getattr(torch, dtype) if dtype else None, overwrite=overwrite)


def rebuild_method(cls: type, hyper_parameters: dict, trainable: dict, checkpoint: dict | None = None):
    """The method ``cls`` built from ``hyper_parameters`` around its teacher, loaded afresh from its
    source, with the trainable tensors ``trainable`` (``{checkpoint key: full tensor}``) in place of
    any init. ``checkpoint`` (default: one holding only ``trainable``) goes through the method's
    ``on_load_checkpoint`` checks (shapes, finite values)."""
    module = cls(**hyper_parameters)
    module.configure_model(restoring=True)  # the checkpoint's tensors replace any init (pca needs no data here)
    state = checkpoint if checkpoint is not None else {"state_dict": dict(trainable)}
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    return module


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    try:
        args = OmegaConf.merge(OmegaConf.structured(ExportArgs), OmegaConf.from_dotlist(argv))
        missing = [k for k in ("ckpt", "out") if OmegaConf.is_missing(args, k)]
        if missing:
            raise ConfigError(f"missing required argument(s): {', '.join(k + '=...' for k in missing)}")
        path = export_checkpoint(args.ckpt, args.out, args.dtype, args.overwrite)
    except Exception as err:  # one clear line for the user, not a traceback
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename:
            err = ConfigError(f"cannot write {err.filename}: {err.strerror or err}")
        if not isinstance(err, (ConfigError, OmegaConfBaseException, FileNotFoundError, ValueError)):
            raise
        print(f"lrc-export: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"exported student to {path}")


if __name__ == "__main__":
    main()
