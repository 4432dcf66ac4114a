"""WikiText-2 perplexity and KL to dense over token windows, one model resident at a time.

Windows follow the pruning literature (:mod:`recoup.stages.model.lm_metrics`): the test
split tokenized once and cut into non-overlapping windows of ``seq_len`` tokens. A
window range ``[start, start + count)`` of that one cut lets evaluation score windows that
tuning never saw (e.g. select's KL calibration reads the first windows), while ``start=0``
is the papers' protocol.

KL(dense || model) needs the dense distribution at every position while the model runs.
Holding both models would double the memory (78 GB of weights for three 13B models), so
:func:`score_one_at_a_time` runs the dense model first and stores its per-token
log-softmax, float16, in one ``.npy`` file (:mod:`recoup.stages.scoring.dense_logprobs`);
the dense model is released, and each other model is then loaded alone and reads the
dense log-probs back batch by batch. Device memory is one model and one batch of logits.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from recoup.cluster.progress import bar as progress_bar
from recoup.stages.model import lm_metrics
from recoup.stages.model.modelio import DTYPES, input_device, load_model_spread
from recoup.stages.scoring.cache import write_checked
from recoup.stages.scoring.dense_logprobs import DenseLogProbs

#: A model's WikiText results: ``{"ppl": ..., "kl_to_dense": ...}``.
Result = dict[str, float]


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


# --------------------------------------------------------------------------- the math


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits -> (B, T, V) float32 log-softmax, as :mod:`lm_metrics` takes it."""
    return F.log_softmax(logits.float(), dim=-1)


def nll_sum(logp: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL from log-probs (B, T, V) of windows ``ids`` (B, T): the sum of
    :func:`lm_metrics.token_nll` (the same log-softmax rows, gathered)."""
    picked = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return -float(picked.double().sum())


def kl_sum(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> float:
    """Summed KL(teacher || student) over positions, from log-probs (B, T, V) each.

    The teacher may come as float16 (the stored dense log-probs): it is widened to float32
    and renormalised (minus its logsumexp) before use. Rounding to float16 moves each
    log-prob by up to 2**-11 of itself, so the rounded distribution's mass is off 1 by
    about that much, an error as large as a small KL; renormalising cancels it. What
    remains is second order, half the rounding's variance: under 1e-6 nats per token
    while the likely tokens' log-probs are above -8 (float16 spacing 2**-8 there). So
    the result is :func:`lm_metrics.token_kl`'s up to the float16 rounding of the dense
    log-probs, the only approximation, far below any KL worth reporting.
    """
    # a new tensor (copy=True): the in-place steps below must not touch the caller's
    t = teacher_logp.to(device=student_logp.device, dtype=torch.float32, copy=True)  # (B, T, V)
    if teacher_logp.dtype != torch.float32:
        t.sub_(t.logsumexp(dim=-1, keepdim=True))
    diff = t - student_logp  # (B, T, V)
    return float(t.exp_().mul_(diff).sum(-1).double().sum())


# --------------------------------------------------------------------------- the passes


def free_memory() -> None:
    """Return a released model's memory now, before the next model is loaded."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _batches(ids: torch.Tensor, batch_size: int) -> range:
    return range(0, ids.shape[0], batch_size)


@torch.inference_mode()
def dense_pass(model: Any, ids: torch.Tensor, batch_size: int, store: DenseLogProbs | None,
               bar: Any) -> float:
    """The dense model over windows ``ids`` (W, T): its summed NLL; with ``store``, its
    log-probs written there batch by batch."""
    nll = 0.0
    device = input_device(model)
    for start in _batches(ids, batch_size):
        batch = ids[start:start + batch_size]  # (B, T)
        logp = log_probs(model(batch.to(device), use_cache=False).logits)  # (B, T, V)
        nll += nll_sum(logp, batch.to(logp.device))
        if store is not None:
            store.write(start, logp)
        bar.update(batch.shape[0])
    return nll


@torch.inference_mode()
def model_pass(model: Any, ids: torch.Tensor, batch_size: int, store: DenseLogProbs,
               bar: Any, name: str) -> tuple[float, float]:
    """Another model over the same windows: (summed NLL, summed KL to the stored dense)."""
    nll = kl = 0.0
    device = input_device(model)
    for start in _batches(ids, batch_size):
        batch = ids[start:start + batch_size]  # (B, T)
        logp = log_probs(model(batch.to(device), use_cache=False).logits)  # (B, T, V)
        if logp.shape[-1] != store.vocab:
            raise ValueError(f"model {name!r} has a vocabulary of {logp.shape[-1]}, the dense "
                             f"model {store.vocab}: KL to dense is undefined")
        nll += nll_sum(logp, batch.to(logp.device))
        kl += kl_sum(store.read(start, start + batch.shape[0]), logp)
        bar.update(batch.shape[0])
    return nll, kl


def score_one_at_a_time(load: Callable[[str], Any], names: Sequence[str], dense: str,
                        ids: torch.Tensor, batch_size: int, logprobs_file: Path, *,
                        done: Callable[[str, Result], None] | None = None,
                        progress: bool = False) -> dict[str, Result]:
    """Perplexity and mean token KL(dense || model) of every model in ``names`` on windows
    ``ids`` (W, T), one model resident at a time.

    ``load(name)`` returns a model ready on its device; it is released (and the memory
    returned) before the next is loaded. The dense model runs first (also when only the
    others are asked for, since their KL needs it) and writes its float16 log-probs to
    ``logprobs_file`` when another model follows; the file is removed on return, also on
    error. ``done(name, result)`` is called as each model finishes, so a caller can store
    results before the next model runs. Returns the results of ``names``.
    """
    others = [n for n in names if n != dense]
    n_pred = ids.shape[0] * (ids.shape[1] - 1)
    n_kl = ids.numel()
    results: dict[str, Result] = {}
    bar = progress_bar(total=ids.shape[0] * (1 + len(others)), desc="perplexity",
                       unit="window", disable=not progress)
    store = DenseLogProbs(logprobs_file, windows=ids.shape[0], seq_len=ids.shape[1]) \
        if others else None
    try:
        model = load(dense)
        try:
            nll = dense_pass(model, ids, batch_size, store, bar)
        finally:
            del model
            free_memory()
        if dense in names:
            results[dense] = {"ppl": lm_metrics.perplexity(nll, n_pred), "kl_to_dense": 0.0}
            if done is not None:
                done(dense, results[dense])
        if store is not None:
            store.finish()
        for name in others:
            assert store is not None
            model = load(name)
            try:
                nll, kl = model_pass(model, ids, batch_size, store, bar, name)
            finally:
                del model
                free_memory()
            results[name] = {"ppl": lm_metrics.perplexity(nll, n_pred),
                             "kl_to_dense": kl / n_kl}
            if done is not None:
                done(name, results[name])
    finally:
        bar.close()
        if store is not None:
            store.remove()
    return results


def score_models_task(folders: dict[str, Path], names: list[str], dense: str, dtype: str,
                      device: str, ids: torch.Tensor, batch_size: int, logprobs_file: Path,
                      out_files: dict[str, Path], reserve_bytes: int, progress: bool) -> None:
    """The evaluate stage's perplexity work as one task (a Ray task that holds the GPUs of
    one model, or a call in the stage's process): :func:`score_one_at_a_time` on the
    models in ``folders``, each loaded in ``dtype`` onto ``device`` (spread over the task's
    GPUs when it does not fit one, ``reserve_bytes`` kept free on each for a batch), and
    each model's result written to its ``out_files`` entry (with the window count) as
    soon as the model finishes, so a crash keeps what was done."""

    def load(name: str) -> Any:
        return load_model_spread(folders[name], DTYPES[dtype], device,
                                 reserve_bytes=reserve_bytes)

    def done(name: str, res: Result) -> None:
        write_checked(out_files[name], {**res, "windows": int(ids.shape[0])})

    score_one_at_a_time(load, names, dense, ids, batch_size, logprobs_file, done=done,
                        progress=progress)
