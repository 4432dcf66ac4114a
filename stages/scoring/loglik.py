"""Log-likelihoods of continuations, batched like a plain forward pass, the context once.

lm-eval's ``HFLM`` scores every (context, continuation) request as its own sequence, so a
four-choice question runs its context four times, and it takes a log-softmax over the whole
vocabulary at every position of every sequence. Here the requests of one document share
their context:

1. *context pass*: the distinct contexts of a batch of documents, sorted by length (little
   padding), right-padded, through the decoder once with the KV cache kept; the LM head
   runs only at each context's last token, whose log-probabilities score every choice's
   first token;
2. *continuation pass*: every choice longer than one token continues from its document's
   cached context (the cache rows repeated per choice, positions resumed after the context's
   true length), the LM head only where a continuation token is predicted.

The tokens are lm-eval's own (its ``_encode_pair``: the caller passes them), the formula is
lm-eval's (sum of the log-softmax at the continuation's tokens, in the logits' dtype, and
whether each was the argmax), so results equal lm-eval's up to float rounding of a
differently shaped batch. Requests that lm-eval would truncate from the left (longer than
the model's window) are not handled here: the caller gives them to lm-eval itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Model families whose logits are exactly ``lm_head(decoder hidden state)`` (no scaling or
#: soft-capping), so the head can run only at the positions that are scored.
HEAD_ONLY_WHERE_SCORED = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"})

Request = tuple[Sequence[int], Sequence[int]]
"""(context tokens, continuation tokens); both non-empty."""


@dataclass(frozen=True)
class _Group:
    """One context and the requests (by index) that continue it."""

    context: tuple[int, ...]
    members: tuple[int, ...]


def group_by_context(requests: Sequence[Request]) -> list[_Group]:
    """Requests with identical context tokens, in first-seen order."""
    members: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both be non-empty")
        members.setdefault(tuple(ctx), []).append(i)
    return [_Group(context=c, members=tuple(m)) for c, m in members.items()]


def batches(groups: Sequence[_Group], requests_per_batch: int) -> list[list[_Group]]:
    """Groups sorted by context length (longest first, as lm-eval orders its requests, so a
    memory problem shows at once), packed until a batch holds ``requests_per_batch``
    requests; a batch holds at least one group."""
    order = sorted(groups, key=lambda g: -len(g.context))
    out: list[list[_Group]] = []
    current: list[_Group] = []
    n = 0
    for g in order:
        if current and n + len(g.members) > requests_per_batch:
            out.append(current)
            current, n = [], 0
        current.append(g)
        n += len(g.members)
    if current:
        out.append(current)
    return out


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) ids and their (B, L) attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


class _Forward:
    """The model split where this scorer needs it: decoder states, then the LM head."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        kind = getattr(model.config, "model_type", None)
        self.split = kind in HEAD_ONLY_WHERE_SCORED and model.get_output_embeddings() is not None
        # transformers renamed ``past_key_values`` to ``cache`` (argument and output)
        params = inspect.signature(type(model).forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                 cache: object | None, keep: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Log-probabilities at the (row, position) pairs ``keep`` (K, 2) -> (K, V), and the
        KV cache after this pass."""
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                  self.cache_arg: cache, "use_cache": True}
        if self.split:
            out = self.model.get_decoder()(**kwargs)
            hidden = out.last_hidden_state[keep[:, 0], keep[:, 1]]  # (K, d)
            logits = self.model.get_output_embeddings()(hidden)  # (K, V)
        else:
            out = self.model(**kwargs)
            logits = out.logits[keep[:, 0], keep[:, 1]]  # (K, V)
        # over every logit, as lm-eval normalises (a padded vocabulary included)
        return F.log_softmax(logits, dim=-1), getattr(out, self.cache_arg)


def score_requests(model: torch.nn.Module, requests: Sequence[Request], *,
                   requests_per_batch: int, pad_id: int = 0,
                   on_documents: Callable[[int], None] | None = None,
                   ) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), continuation is the greedy one)`` for every
    request, in input order, as lm-eval's ``HFLM._loglikelihood_tokens`` defines them.

    ``on_documents(n)`` is told after each batch how many distinct contexts it finished
    (progress). Runs on the model's device, without gradients.
    """
    device = next(model.parameters()).device
    fwd = _Forward(model)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    with torch.inference_mode():
        for batch in batches(group_by_context(requests), requests_per_batch):
            ctx_ids, ctx_mask = _pad([g.context for g in batch], pad_id)  # (G, Lc)
            lengths = ctx_mask.sum(dim=1)  # (G,)
            positions = torch.arange(ctx_ids.shape[1]).expand_as(ctx_ids)  # (G, Lc)
            last = torch.stack([torch.arange(len(batch)), lengths - 1], dim=1)  # (G, 2)
            # No mask: padding is on the right, so under the causal mask no real token sees
            # it, and attention keeps its fast causal path. The continuation pass masks the
            # padding's cache entries.
            # Index tensors stay on the CPU: a CPU index works on a tensor of any device,
            # and a model spread over GPUs (device_map) returns its states on the last
            # one while its cache layers live on theirs.
            first_lp, cache = fwd(ctx_ids.to(device), None, positions.to(device), None,
                                  last)  # (G, V)
            # Continuations longer than one token resume from their context's cache.
            rows = [(gi, r) for gi, g in enumerate(batch) for r in g.members
                    if len(requests[r][1]) > 1]
            rest: dict[int, tuple[torch.Tensor, int]] = {}  # request -> (its (k-1, V), offset)
            if rows:
                tails = [list(requests[r][1][:-1]) for _, r in rows]
                tail_ids, tail_mask = _pad(tails, pad_id)  # (R, Lk)
                owner = torch.tensor([gi for gi, _ in rows])  # (R,)
                cache.batch_select_indices(owner)
                mask = torch.cat([ctx_mask[owner], tail_mask], dim=1)  # (R, Lc + Lk)
                # contexts of one length leave no padding in the cache: no mask needed
                mask = None if bool(ctx_mask.all()) else mask.to(device)
                pos = lengths[owner, None] + torch.arange(tail_ids.shape[1])  # (R, Lk)
                keep = tail_mask.nonzero()  # (K, 2) row-major: row by row, in order
                tail_lp, _ = fwd(tail_ids.to(device), mask, pos.to(device), cache,
                                 keep)  # (K, V)
                offset = 0
                for (_, r), tail in zip(rows, tails, strict=True):
                    rest[r] = (tail_lp, offset)
                    offset += len(tail)
            for gi, g in enumerate(batch):
                for r in g.members:
                    cont = requests[r][1]
                    lp = first_lp[gi:gi + 1]  # (1, V)
                    if r in rest:
                        tail_lp, offset = rest[r]
                        lp = torch.cat([lp, tail_lp[offset:offset + len(cont) - 1]])  # (k, V)
                    toks = torch.tensor(list(cont), dtype=torch.long, device=lp.device)
                    picked = lp.gather(1, toks[:, None]).squeeze(1)  # (k,)
                    greedy = bool((lp.argmax(dim=-1) == toks).all())
                    results[r] = (float(picked.sum()), greedy)
            if on_documents is not None:
                on_documents(len(batch))
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]
