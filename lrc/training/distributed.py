"""Multi-process training: FSDP2 for ``trainer=fsdp``, and the helpers every strategy shares.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard``) set up for a
distillation model: one data-parallel mesh over every process, one sharding unit per decoder layer
(for ``lrc``: a clone layer holds that teacher layer's frozen weights next to its projections and
gains, so teacher and student of a layer are gathered together and freed together), then the root
(embedding, final norms, head). The frozen teacher is sharded like the rest; it never enters the
optimizer or a checkpoint.

Mixed precision is FSDP2's ``MixedPrecisionPolicy``: the sharded master tensors keep their own dtype
(fp32 projections and gains, the teacher's dtype for the teacher), the gathered copies used in
forward and backward are ``param_dtype`` (bf16 on GPUs) and gradients are reduced across processes in
``reduce_dtype`` (fp32), landing on the fp32 shards the optimizer updates. Lightning's own
half-precision ``*-true`` settings would cast the master tensors themselves, so they are refused.

Checkpoints are sharded (:func:`lrc.training.checkpoint_io.save_sharded_checkpoint`): a directory
``last.ckpt/`` written by every process with ``torch.distributed.checkpoint`` holding only the
trainable tensors and the optimizer state, plus ``meta.pt`` (step, schedule, data position, config).
They resume on any number of processes (the reader re-shards) and, read into full tensors, under
``trainer=cpu|gpu|ddp`` and by ``lrc-export``, which never needs the teacher from the checkpoint.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lrc.model.checkpointing import apply_activation_checkpointing, checkpointing_mode

#: ``trainer.strategy.param_dtype`` / ``reduce_dtype`` names
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Lightning precisions that cast the master tensors themselves (refused with FSDP2)
CASTING_PRECISIONS = ("bf16-true", "16-true", "bf16", "16", "64-true", "64", "transformer-engine")


def _dtype(key: str, name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"trainer.strategy.{key} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP2 units of their own, in forward order: every entry of every
    ``layers`` ``ModuleList`` in ``model`` (the clone's decoder layers; the teacher's and the
    student's decoder layers of a baseline). Whatever is left (embeddings, norms, heads) goes to
    the root unit."""
    units: list[nn.Module] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            units.extend(mod)
    return units


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (``trainer=fsdp``), for a :class:`~lrc.training.module.DistillModule`.

    Args:
        param_dtype: dtype of the gathered parameters in forward and backward (the compute dtype).
        reduce_dtype: dtype gradients are reduced in across processes.
        activation_checkpointing: ``false``/"off", ``true``/"full" or "student"
            (:func:`apply_activation_checkpointing`): recompute each layer's activations in backward
            instead of keeping them; "full" costs about one more forward of both models, "student"
            one more student forward and keeps the teacher's clone-term targets.
        reshard_after_forward: free each layer's gathered parameters after its forward and gather
            them again in backward (ZeRO-3); ``False`` keeps them until backward (ZeRO-2-like).
            The root unit (embeddings, final norms, heads) is always kept until its backward.
        process_group_backend: ``nccl`` on GPUs and ``gloo`` on CPUs when ``None``.
    """

    def __init__(
        self,
        param_dtype: str = "bfloat16",
        reduce_dtype: str = "float32",
        activation_checkpointing: bool | str = False,
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        self.param_dtype = _dtype("param_dtype", param_dtype)
        self.reduce_dtype = _dtype("reduce_dtype", reduce_dtype)
        self.activation_checkpointing = checkpointing_mode(activation_checkpointing)
        self.reshard_after_forward = bool(reshard_after_forward)
        super().__init__(process_group_backend=process_group_backend, save_distributed_checkpoint=True)

    # ------------------------------------------------------------------------ processes
    def setup_environment(self) -> None:
        # one data-parallel dimension over every process of every node (no tensor parallelism)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        precision = str(getattr(trainer, "precision", "32-true"))
        if precision in CASTING_PRECISIONS:
            raise ValueError(
                f"trainer.precision={precision} casts the fp32 master projections themselves; with trainer=fsdp keep "
                f"32-true (or bf16-mixed): the compute dtype is trainer.strategy.param_dtype"
            )
        super().setup(trainer)

    # ------------------------------------------------------------------------- sharding
    def parallelize(self, module: Any) -> None:
        """Shard ``module.model`` (a built :class:`DistillModule`'s model): optional activation
        checkpointing of every unit (:func:`apply_activation_checkpointing`), ``fully_shard`` of every
        :func:`sharding_units` entry, then of the model itself. Idempotent (Lightning calls
        ``configure_model`` for every fit / validate)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = module.model
        if model is None or is_sharded(model):
            return
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        units = sharding_units(model)
        apply_activation_checkpointing(units, self.activation_checkpointing)
        for unit in units:
            # the last unit's parameters are needed again at once by the root's backward: keep them
            fully_shard(unit, mesh=mesh, mp_policy=policy,
                        reshard_after_forward=self.reshard_after_forward and unit is not units[-1])
        # the root unit (embeddings, final norms, heads) stays gathered from its forward to its
        # backward: the loss reads the heads between the two (CE and KL from the hidden states,
        # lrc.losses.chunked_ce_kl), and the backward needs them again at once
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)

    # ---------------------------------------------------------------------- checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable tensors only (this process's shards, as DTensors): the teacher is never
        gathered, copied or written."""
        return {n: p.detach() for n, p in self.lightning_module.named_parameters() if p.requires_grad}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        from lrc.training.checkpoint_io import save_sharded_checkpoint

        if storage_options is not None:
            raise TypeError("FSDP2Strategy.save_checkpoint takes no storage_options")
        save_sharded_checkpoint(checkpoint, self.broadcast(str(filepath)), self)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from lrc.training.checkpoint_io import load_into_sharded

        return load_into_sharded(self.broadcast(str(checkpoint_path)), self.lightning_module, self.optimizers)

    def remove_checkpoint(self, filepath: Any) -> None:
        import shutil
        from pathlib import Path

        if self.is_global_zero:
            path = Path(filepath)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of a DTensor, ``t`` itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def any_distributed(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> bool:
    return any(hasattr(t, "to_local") for t in tensors)


def all_ranks_min(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of ``flags`` over every process (identity without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = flags.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return flags


def full_trainable_state(module: Any) -> dict[str, torch.Tensor]:
    """``{name: full tensor on the CPU}`` of the module's trainable parameters; sharded ones are
    gathered (a collective: every process calls it), never the teacher."""
    out = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[n] = (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
    return out


def export_student(module: Any, trainer: Any, path: Any, dtype: torch.dtype | None = None) -> Any:
    """Write the plain student of a trained ``module`` to ``path`` from rank 0 (every process calls
    this; the others return ``None``). A sharded model gathers its trainable tensors only; rank 0
    rebuilds the method around a teacher loaded afresh from its source, as lrc-export does, so the
    teacher is never gathered."""
    if module.model is None or not is_sharded(module.model):
        return module.save_student(path, dtype=dtype, overwrite=True) if trainer.is_global_zero else None
    state = full_trainable_state(module)
    if not trainer.is_global_zero:
        return None
    from lrc.cli.export import rebuild_method

    rebuilt = rebuild_method(type(module), dict(module.hparams), state)
    return rebuilt.save_student(path, dtype=dtype, overwrite=True)
