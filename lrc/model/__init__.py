"""The Low-Rank Clone model: teacher adapters, clone modules, export."""

from lrc.model.clone import CloneOutput, LowRankClone
from lrc.model.config import CloneConfig
from lrc.model import pca as _pca  # noqa: F401  (registers init "pca")
from lrc.model.init import InitContext, register_projection_init

__all__ = ["CloneConfig", "CloneOutput", "InitContext", "LowRankClone", "register_projection_init"]
