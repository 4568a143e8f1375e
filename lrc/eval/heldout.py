"""Held-out language-modelling metrics of a student, and of its teacher beside it.

Over every validation sequence of a data module (lrc-distill's ``TokenMixDataModule``: by default
the embedded corpus's held-out packages): next-token CE and perplexity of the student (and the
teacher), and, with a teacher, KL(teacher ‖ student) at temperature 1 and top-1 agreement, each
per position and averaged over every position, as lrc-distill's validation logs ``val/*``.
CE and KL come from :mod:`lrc.losses`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = ["heldout_metrics"]


def heldout_metrics(student: Any, batches: Iterable[dict], teacher: Any | None = None) -> dict[str, float]:
    """``ce``, ``ppl``, ``tokens`` (scored targets) and, with ``teacher``, ``teacher_ce``,
    ``teacher_ppl``, ``kl`` and ``top1_agreement``, over ``batches`` of ``{"input_ids": (B, T)}``."""
    import torch

    from lrc.losses import kl_divergence, next_token_cross_entropy

    device = next(student.parameters()).device
    sums = {"ce": 0.0, "teacher_ce": 0.0, "kl": 0.0, "top1_agreement": 0.0}
    targets = positions = 0
    with torch.no_grad():
        for batch in batches:
            ids = batch["input_ids"].to(device)
            s = student(input_ids=ids).logits.float()
            n_targets, n_positions = ids.shape[0] * (ids.shape[1] - 1), ids.numel()
            sums["ce"] += float(next_token_cross_entropy(s, ids)) * n_targets
            if teacher is not None:
                t = teacher(input_ids=ids.to(next(teacher.parameters()).device)).logits.float().to(device)
                sums["teacher_ce"] += float(next_token_cross_entropy(t, ids)) * n_targets
                sums["kl"] += float(kl_divergence(s, t, temperature=1.0, reduction="token_mean")) * n_positions
                sums["top1_agreement"] += float((s.argmax(-1) == t.argmax(-1)).float().sum())
            targets += n_targets
            positions += n_positions
    if not targets:
        raise ValueError("no held-out sequence to evaluate: the data module's validation split is empty")
    out = {"ce": sums["ce"] / targets}
    out["ppl"] = math.exp(out["ce"])
    if teacher is not None:
        out["teacher_ce"] = sums["teacher_ce"] / targets
        out["teacher_ppl"] = math.exp(out["teacher_ce"])
        out["kl"] = sums["kl"] / positions
        out["top1_agreement"] = sums["top1_agreement"] / positions
    out["tokens"] = targets
    return out
