"""A run's plan: sequences per optimizer step, gradient accumulation, and planned tokens against
the unique tokens the data mix declares. Pure functions, except :func:`device_count`, which asks
Lightning how many devices a ``trainer.devices`` setting means on this machine."""

from __future__ import annotations

from typing import Any, Iterable, Mapping


def accumulation_steps(global_batch_size: int, micro_batch_size: int, devices: int, num_nodes: int = 1) -> int:
    """Micro-batches per optimizer step so that every step sees ``global_batch_size`` sequences:
    ``global_batch_size / (micro_batch_size * devices * num_nodes)``.

    Raises ``ValueError`` naming the keys when it does not divide, with the device counts that would.
    """
    for key, val in (("global_batch_size", global_batch_size), ("data.batch_size", micro_batch_size),
                     ("trainer.devices", devices), ("trainer.num_nodes", num_nodes)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{key} must be a positive integer, got {val!r}")
    per_pass = micro_batch_size * devices * num_nodes
    if global_batch_size % per_pass:
        fits = [n for n in range(1, global_batch_size // micro_batch_size + 1)
                if global_batch_size % (micro_batch_size * n) == 0]
        raise ValueError(
            f"global_batch_size={global_batch_size} sequences is not a multiple of data.batch_size={micro_batch_size} "
            f"x {devices} device(s) x {num_nodes} node(s) = {per_pass} sequences per pass; with "
            f"data.batch_size={micro_batch_size} the total device count (devices x nodes) must be one of {fits}, "
            f"or change data.batch_size"
        )
    return global_batch_size // per_pass


def tokens_per_step(seq_len: int, micro_batch_size: int, devices: int = 1, num_nodes: int = 1,
                    accumulate: int = 1) -> int:
    """Tokens one optimizer step sees on all devices together."""
    return seq_len * micro_batch_size * devices * num_nodes * accumulate


def declared_unique_tokens(sources: Iterable[Mapping[str, Any]]) -> int | None:
    """Sum of the sources' ``unique_tokens``; ``None`` when any source does not declare it."""
    counts = [s.get("unique_tokens") for s in sources]
    if not counts or any(c is None for c in counts):
        return None
    return int(sum(counts))


def check_token_budget(planned_tokens: int, unique_tokens: int | None, epochs: float) -> None:
    """``ValueError`` when a run plans more than ``epochs`` passes over its data's unique tokens."""
    if not epochs > 0:
        raise ValueError(f"max_data_epochs must be > 0, got {epochs!r}")
    if unique_tokens is not None and planned_tokens > epochs * unique_tokens:
        raise ValueError(
            f"the run plans {planned_tokens:,} tokens (trainer.max_steps x tokens per step) but its data "
            f"declares {unique_tokens:,} unique tokens (the sources' unique_tokens) and max_data_epochs={epochs}: "
            f"that is {planned_tokens / unique_tokens:.2f} passes; shorten the run, use a larger mix, or set "
            f"max_data_epochs to the passes you want"
        )


def device_count(accelerator: str, devices: Any) -> int:
    """The number of devices ``trainer.devices`` means for ``trainer.accelerator`` on this machine
    (``-1`` and ``"auto"`` resolved the way Lightning resolves them)."""
    import torch
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    name = str(accelerator)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("gpu", "cuda"):
        acc = CUDAAccelerator
    elif name == "cpu":
        acc = CPUAccelerator
    else:
        from lightning.pytorch.accelerators import AcceleratorRegistry

        acc = type(AcceleratorRegistry.get(name))
    try:
        parsed = acc.parse_devices(acc.auto_device_count() if devices == "auto" else devices)
    except Exception as err:  # Lightning raises TypeError or MisconfigurationException
        raise ValueError(f"trainer.devices={devices!r} with trainer.accelerator={accelerator!r}: {err}") from None
    n = parsed if isinstance(parsed, int) else len(parsed or [])
    if n < 1:
        raise ValueError(f"trainer.devices={devices!r} with trainer.accelerator={accelerator!r} selects no device")
    return n
