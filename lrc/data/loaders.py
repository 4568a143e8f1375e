"""The loaders :class:`~lrc.data.datamodule.TokenMixDataModule` and
:class:`~lrc.data.chat_datamodule.ChatDataModule` share: a resumable training loader over the
module's :class:`~lrc.data.resume.TrainMixture`, and a validation loader reading
``val_dataset`` at ``val_indices`` in order."""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import DataLoader, Dataset, Subset

from lrc.data.resume import ResumableDataLoader, ResumableDataModule


def load_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` itself, or the ``AutoTokenizer`` a string / path names."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    return tokenizer


class MixtureDataModule(ResumableDataModule):
    """:class:`~lrc.data.resume.ResumableDataModule` plus the loaders (mixed in before
    ``LightningDataModule``).

    The subclass also sets ``sources``, ``batch_size``, ``val_batch_size``, ``num_workers``,
    ``pin_memory``, ``val_dataset`` (None until set up) and ``val_indices``, and implements
    ``setup`` (which builds ``mixture``, ``val_dataset`` and ``val_indices``) and
    :meth:`_no_validation_message`.
    """

    sources: list
    val_dataset: Dataset | None
    val_indices: list[int]
    val_batch_size: int
    num_workers: int
    pin_memory: bool

    @property
    def source_names(self) -> list[str]:
        """Source names; ``batch["source_ids"]`` indexes this list."""
        return [s.name for s in self.sources]

    def _no_validation_message(self) -> str:
        raise NotImplementedError

    def check_data(self, require_validation: bool = True) -> None:
        """Read, tokenize and pack the data now (``setup("fit")``) and raise one ``ValueError``
        saying what to change when it cannot train: a bad row, fewer sequences than one batch, or
        (``require_validation``) no validation sequence.

        In-memory sources are read in full (and cached), so training does not read them again;
        streaming sources are checked on their held-out head and on the chunks of the first batch
        (a bad row further on is reported when training reaches it).
        """
        self.setup("fit")
        self.mixture.check_first_batch()
        if require_validation and not self.val_indices:
            raise ValueError(self._no_validation_message())

    def train_dataloader(self) -> ResumableDataLoader:
        if self.mixture is None:
            self.setup("fit")
        return self._resumable_loader(num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            self.setup("validate")
        if not self.val_indices:
            return []
        # a Subset read sequentially (not a custom sampler): Lightning sees an unshuffled loader
        return DataLoader(
            Subset(self.val_dataset, list(self.val_indices)), batch_size=self.val_batch_size, shuffle=False,
            num_workers=self.num_workers, pin_memory=self.pin_memory, drop_last=False,
        )
