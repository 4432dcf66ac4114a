"""WikiText-2 perplexity and KL to dense over token windows: the math, no I/O.

Windows follow the pruning literature (:mod:`recoup.stages.model.lm_metrics`): the test
split tokenized once and cut into non-overlapping windows of ``seq_len`` tokens. A
window range ``[start, start + count)`` of that one cut lets evaluation score windows that
tuning never saw (e.g. select's KL calibration reads the first windows), while ``start=0``
is the papers' protocol.
"""

from __future__ import annotations

from typing import Any

import torch

from recoup.cluster.progress import bar as progress_bar
from recoup.stages.model import lm_metrics


def window_range(ids: torch.Tensor, seq_len: int, start: int,
                 count: int | None) -> torch.Tensor:
    """(T,) token ids -> (W, seq_len): windows ``start .. start + count - 1`` of the
    non-overlapping cut (``count`` None: all from ``start``; fewer if the text ends)."""
    if start < 0:
        raise ValueError(f"window start must be >= 0, got {start}")
    every = lm_metrics.windows(ids, seq_len, None)  # (W_all, seq_len)
    if start >= every.shape[0]:
        raise ValueError(f"evaluate.window_start={start} is past the text's last window "
                         f"(it has {every.shape[0]} windows of {seq_len} tokens)")
    end = every.shape[0] if count is None else min(every.shape[0], start + count)
    return every[start:end]  # (W, seq_len)


def evaluate_models(models: dict[str, Any], dense: Any, ids: torch.Tensor, batch_size: int,
                    device: torch.device, progress: bool) -> dict[str, dict[str, float]]:
    """Perplexity of each model and mean token KL(dense || model) on windows ``ids`` (W, T).

    The models run window by window beside the dense one, so the dense logits the KL needs
    are never stored: memory is the models plus one batch of logits.
    """
    nll = dict.fromkeys(models, 0.0)
    kl = dict.fromkeys(models, 0.0)
    n_pred = n_kl = 0
    bar = progress_bar(total=ids.shape[0], desc="perplexity", unit="window",
                       disable=not progress)
    with torch.inference_mode():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size].to(device)  # (B, T)
            ref = dense(batch).logits
            for name, model in models.items():
                logits = ref if model is dense else model(batch).logits
                nll[name] += float(lm_metrics.token_nll(logits, batch).double().sum())
                kl[name] += float(lm_metrics.token_kl(ref, logits).double().sum())
            n_pred += batch.shape[0] * (batch.shape[1] - 1)
            n_kl += batch.numel()
            bar.update(batch.shape[0])
    bar.close()
    return {
        name: {"ppl": lm_metrics.perplexity(nll[name], n_pred), "kl_to_dense": kl[name] / n_kl}
        for name in models
    }
