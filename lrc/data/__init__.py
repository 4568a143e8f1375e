"""Data side of LRC distillation: offline corpus, sources, packing, mixing and the data module.

* :mod:`lrc.data.corpus` -- the embedded corpus (docstrings/docs of the installed packages);
* :mod:`lrc.data.sources` -- :class:`SourceConfig`, readers, chat rendering, validation;
* :mod:`lrc.data.packing` -- tokenize/pack/segment ids and the mixture schedule (pure functions);
* :mod:`lrc.data.cache` -- the packed-token cache of in-memory sources;
* :mod:`lrc.data.in_memory` / :mod:`lrc.data.streaming` -- the two kinds of training data behind
  one interface (:class:`~lrc.data.resume.TrainMixture`);
* :mod:`lrc.data.resume` -- the resumable loader and the data modules' exact mid-epoch resume;
* :mod:`lrc.data.datamodule` -- :class:`TokenMixDataModule` (Lightning), the distillation data;
* :mod:`lrc.data.chat` / :mod:`lrc.data.chat_datamodule` -- conversations with assistant-only
  labels and :class:`ChatDataModule` (Lightning), the SFT data.

Names are imported lazily so that ``import lrc.data.corpus`` stays free of torch/lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CorpusFiles": "lrc.data.corpus",
    "build_embedded_corpus": "lrc.data.corpus",
    "SourceConfig": "lrc.data.sources",
    "override_sources": "lrc.data.sources",
    "validate_source": "lrc.data.sources",
    "pack_documents": "lrc.data.packing",
    "interleave": "lrc.data.packing",
    "mixture_counts": "lrc.data.packing",
    "TokenMixDataModule": "lrc.data.datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lrc.data' has no attribute {name!r}")
