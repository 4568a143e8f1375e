"""Conversations for supervised fine-tuning: render, label the assistant's tokens, pack.

Pure functions over token arrays (no torch, no Lightning):

* :func:`render_with_labels` renders a conversation (``[{"role", "content"}]``, see
  :func:`lrc.data.sources.normalize_messages` for the ``messages`` and ShareGPT schemas) with the
  tokenizer's chat template and returns its token ids and labels: every token of an assistant
  turn, from the first token of its content through the template's end-of-turn token, carries
  its own id as label; every other token (system and user turns, role headers, the template's
  formatting after the end-of-turn token) carries ``-100``. An assistant turn is the text the
  template adds between ``apply_chat_template(messages[:i], add_generation_prompt=True)`` and
  ``apply_chat_template(messages[:i + 1])``; its end-of-turn token is the last special token in
  that text (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama-3), and text after it (ChatML's
  newline) is not trained on. A template that does not render conversations prefix by prefix
  (one that rewrites earlier turns) is refused with a ``ValueError``.
* :func:`pack_conversations` places tokenized conversations into rows of exactly ``seq_len``
  tokens: several per row (``packing=True``, in order, a conversation that does not fit starts
  the next row) or one per row; a conversation longer than ``seq_len`` is cut to its first
  ``seq_len`` tokens. Rows are padded; each row carries segment ids (0, 1, ... per conversation,
  one more for the padding) so that packed conversations never attend to each other.

Labels are aligned with ``input_ids``: the loss of position ``t`` predicts ``labels[t + 1]``
(:func:`lrc.losses.next_token_cross_entropy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["ChatRows", "IGNORE", "assistant_spans", "pack_conversations", "render_with_labels"]

#: The label of a token that is not trained on.
IGNORE = -100


def _render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(messages: Sequence[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text of ``messages`` and the character span ``[start, end)`` of each assistant
    turn in it (its content and what the template closes the turn with)."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant message; it needs a user turn first")
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        end = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(end) and end.startswith(start)):
            raise ValueError(
                "the chat template does not render this conversation prefix by prefix (it changes earlier turns "
                f"when turn {i + 1} is added), so the assistant's tokens cannot be located"
            )
        spans.append((len(start), len(end)))
    return text, spans


def render_with_labels(messages: Sequence[dict], tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation rendered with the tokenizer's chat template;
    labels are ``-100`` outside the assistant turns (see the module docstring)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("labelling assistant tokens needs a fast tokenizer (character offsets)")
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    labels = [IGNORE] * len(ids)
    starts = [a for a, _ in offsets]
    for s, e in spans:
        inside = [t for t, a in enumerate(starts) if s <= a < e]
        ends = [t for t in inside if ids[t] in special]
        last = ends[-1] if ends else (inside[-1] if inside else -1)
        for t in inside:
            if t <= last:
                labels[t] = ids[t]
    return ids, labels


@dataclass
class ChatRows:
    """Packed rows of conversations, each exactly ``seq_len`` long.

    Attributes:
        input_ids: ``(rows, seq_len)`` token ids (padding: ``pad_id``).
        labels: ``(rows, seq_len)`` int64, ``-100`` where nothing is trained.
        segment_ids: ``(rows, seq_len)`` int64: 0, 1, ... per conversation, one more for padding.
        attention_mask: ``(rows, seq_len)`` int64, 0 on padding.
        conversations: conversations placed; truncated: of those, cut to ``seq_len``; dropped:
            conversations left out (no assistant token within ``seq_len``, or none at all).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray
    attention_mask: np.ndarray
    conversations: int = 0
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_conversations(
    conversations: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int, packing: bool = True
) -> ChatRows:
    """Place ``(input_ids, labels)`` conversations into rows of ``seq_len`` tokens (see the module
    docstring). A conversation is dropped when no labelled token is left within ``seq_len``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = seq_len  # tokens in the current row (a full "row" before the first)
    placed = truncated = dropped = 0
    for ids, labels in conversations:
        cut = len(ids) > seq_len
        ids, labels = list(ids[:seq_len]), list(labels[:seq_len])
        if all(x == IGNORE for x in labels[1:]):  # the first label is never a target
            dropped += 1
            continue
        truncated += cut
        if not packing or used + len(ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, labels))
        used += len(ids)
        placed += 1
    n = len(rows)
    out_ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    out_labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    out_seg = np.zeros((n, seq_len), dtype=np.int64)
    out_mask = np.zeros((n, seq_len), dtype=np.int64)
    for r, row in enumerate(rows):
        pos = 0
        for k, (ids, labels) in enumerate(row):
            out_ids[r, pos : pos + len(ids)] = ids
            out_labels[r, pos : pos + len(ids)] = labels
            out_seg[r, pos : pos + len(ids)] = k
            out_mask[r, pos : pos + len(ids)] = 1
            pos += len(ids)
        out_seg[r, pos:] = len(row)
    return ChatRows(out_ids, out_labels, out_seg, out_mask, placed, truncated, dropped)
