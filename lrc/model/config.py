"""``CloneConfig``: what the student is (rank, projection sharing, kept layers, initialisation)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from lrc.layer_select import LayerSpec, plain_layer_spec, select_layers
from lrc.model.init import ProjectionInit, get_projection_init, init_requires_untied_head

SHARING_MODES = ("all", "io")
PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "teacher": None}


@dataclass
class CloneConfig:
    """Student definition. Validated against the teacher by :meth:`validate_for`.

    rank:               student hidden size d, 1 <= d <= teacher hidden size D, and one that
                        transformers accepts for the export (Llama: a multiple of the head count).
    attn_sharing:       "all" = separate Pq, Pk, Pv (paper default); "io" = one shared Pqkv.
    ffn_sharing:        "all" = separate Pgate, Pup; "io" = one shared Pgate_up.
    tie_head_projection: Phead = Pembed. ``None`` = tie exactly when the teacher ties its head
                        (never with an init that needs its own head projection, like "pca").
    layers:             the teacher layers the student keeps, as a layer spec of
                        :mod:`lrc.layer_select` (``None`` = all; a list of indices, negative ones
                        counted from the end; ``{"every": k}``, ``{"first": k}``, ``{"last": k}``,
                        ``{"fraction": f}``), so one setting fits any teacher.
    layer_stride:       deprecated alias of ``layers={"every": k}``; exclusive with ``layers``.
    init:               registered initialiser name (see :mod:`lrc.model.init`) or a callable;
                        "pca" (:mod:`lrc.model.pca`) needs calibration data.
    init_calibration_sequences: training sequences the trainer hands a data-aware init ("pca").
    init_std:           standard deviation for the "normal" initialiser (reference: 0.02).
    seed:               seed of the projection initialisation.
    rms_norm_eps:       student RMSNorm epsilon (``None`` = the teacher's); written to the export.
    param_dtype:        dtype of the trainable tensors: "float32" (default: fp32 master weights,
                        cast to the teacher's dtype for compute) or "teacher" (same as the teacher).
    projection_path:    how a forward applies each student matrix: "materialise" the product
                        W_t @ P once per forward, apply the two "factored" matrices to the
                        activations, or "auto": per projection, the path of fewer FLOPs for the
                        forward's token count (:func:`lrc.model.layers.projection_path_flops`).
                        Same results either way; the export always merges.
    """

    rank: int
    attn_sharing: Literal["all", "io"] = "all"
    ffn_sharing: Literal["all", "io"] = "all"
    tie_head_projection: bool | None = None
    layers: LayerSpec = None
    layer_stride: int | None = None
    init: str | ProjectionInit = "normal"
    init_std: float = 0.02
    init_calibration_sequences: int = 16
    seed: int = 0
    rms_norm_eps: float | None = None
    param_dtype: str = "float32"
    projection_path: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, saved with exports

    def kept_layers(self, num_teacher_layers: int) -> list[int]:
        """Validated, sorted teacher indices of the layers the student keeps."""
        n = num_teacher_layers
        if self.layers is not None and self.layer_stride is not None:
            raise ValueError("CloneConfig: set at most one of 'layers' and 'layer_stride'")
        if self.layer_stride is not None:
            k = self.layer_stride
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
                raise ValueError(
                    f"CloneConfig.layer_stride must be an integer in [1, {n}], got {self.layer_stride!r}"
                )
            return select_layers({"every": k}, n, "CloneConfig.layer_stride")
        return select_layers(self.layers, n, "CloneConfig.layers")

    def validate(self, teacher_hidden_size: int, num_teacher_layers: int) -> None:
        """Raise ``ValueError`` naming the key and the allowed range for any bad value."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= teacher_hidden_size:
            raise ValueError(
                f"CloneConfig.rank must be an integer in [1, {teacher_hidden_size}] "
                f"(the teacher's hidden size), got {self.rank!r}"
            )
        for key in ("attn_sharing", "ffn_sharing"):
            if getattr(self, key) not in SHARING_MODES:
                raise ValueError(f"CloneConfig.{key} must be one of {SHARING_MODES}, got {getattr(self, key)!r}")
        if not self.init_std > 0:
            raise ValueError(f"CloneConfig.init_std must be > 0, got {self.init_std!r}")
        if self.rms_norm_eps is not None and not self.rms_norm_eps > 0:
            raise ValueError(f"CloneConfig.rms_norm_eps must be > 0 or None, got {self.rms_norm_eps!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"CloneConfig.param_dtype must be one of {sorted(PARAM_DTYPES)}, got {self.param_dtype!r}")
        from lrc.model.layers import PROJECTION_PATHS

        if self.projection_path not in PROJECTION_PATHS:
            raise ValueError(
                f"CloneConfig.projection_path must be one of {PROJECTION_PATHS}, got {self.projection_path!r}"
            )
        get_projection_init(self.init)
        if self.tie_head_projection and init_requires_untied_head(self.init):
            raise ValueError(
                f"CloneConfig.init={self.init!r} gives the head a projection of its own: set "
                "tie_head_projection to false or null, not true"
            )
        n = self.init_calibration_sequences
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"CloneConfig.init_calibration_sequences must be an integer >= 1, got {n!r}")
        self.kept_layers(num_teacher_layers)

    def validate_for(self, teacher_config: Any) -> None:
        """:meth:`validate` against a transformers teacher config (no weights needed), and check that
        transformers accepts the exported student of this rank (see
        :func:`lrc.model.export.check_exportable_rank`): a rank that cannot be exported is refused
        before any training, naming the nearest ranks that can."""
        from lrc.model.export import check_exportable_rank

        self.validate(int(teacher_config.hidden_size), int(teacher_config.num_hidden_layers))
        check_exportable_rank(teacher_config, self.rank)

    def torch_param_dtype(self) -> torch.dtype | None:
        """The trainable tensors' dtype (``None`` = the teacher's)."""
        return PARAM_DTYPES[self.param_dtype]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = plain_layer_spec(self.layers)
        if callable(self.init):
            d["init"] = getattr(self.init, "__qualname__", repr(self.init))
        return d
