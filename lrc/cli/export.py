"""``lrc-export ckpt=PATH out=DIR [dtype=bfloat16] [overwrite=true]``

Writes the merged plain transformers student from a distillation checkpoint alone: the checkpoint
holds the resolved config (teacher source, student, loss), so no training flag is repeated.
"""

from __future__ import annotations

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


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    import torch

    from lrc.training.module import DistillModule

    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_file():
        raise ConfigError(f"checkpoint {ckpt} does not exist")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass overwrite=true to replace it")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if "lrc" not in state or "hyper_parameters" not in state:
        raise ConfigError(f"{ckpt} is not an lrc-distill checkpoint")
    module = DistillModule(**state["hyper_parameters"])
    module.configure_model()
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    return module.clone.save_student(out, dtype=getattr(torch, dtype) if dtype else None, overwrite=overwrite)


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

        if not isinstance(err, (ConfigError, OmegaConfBaseException, FileNotFoundError, ValueError)):
            raise
        print(f"lrc-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported student to {path}")


if __name__ == "__main__":
    main()
