"""Memory and disk of evaluate's WikiText scoring, from the model card alone.

What :mod:`recoup.stages.scoring.wikitext` holds beside one model's weights, and what its
stored dense log-probs take on disk; ``recoup plan`` sums these (the evaluate stage's
estimate), and the scoring itself keeps the working set free on every GPU when it spreads
a model over several (:func:`recoup.stages.model.modelio.load_model_spread`).
"""

from __future__ import annotations

from recoup.orchestrator.estimate import FP32, ITEMSIZE, forward_working_bytes
from recoup.stages.model.modelio import ModelCard

#: WikiText-2 test tokens under the Llama-2 tokenizer (about 341k: 166 windows of 2048), for
#: the plan's disk figure; the stage itself counts the real windows.
WIKITEXT2_TEST_TOKENS = 341_469
#: bytes per stored dense log-prob (float16, :mod:`recoup.stages.scoring.dense_logprobs`)
STORED_ITEMSIZE = 2


def working_parts(card: ModelCard, *, batch_size: int, seq_len: int) -> dict[str, int]:
    """Device bytes of one batch beside the weights, at its peak: the KL of
    :func:`recoup.stages.scoring.wikitext.model_pass` (the model's logits and their float32
    log-softmax, the dense log-probs as read and widened, and the KL term). No KV cache:
    the forward runs with ``use_cache=False``."""
    item = ITEMSIZE[card.dtype]
    tokens = batch_size * seq_len
    logits = tokens * card.vocab
    return {
        "forward working set": forward_working_bytes(card, tokens, item),
        "logits of a batch": logits * item,
        "float32 log-softmax of the logits": logits * FP32,
        "dense log-probs read back (float16), float32 copy, KL term":
            logits * (STORED_ITEMSIZE + 2 * FP32),
    }


def logprobs_disk_bytes(card: ModelCard, *, seq_len: int, window_start: int,
                        max_windows: int | None) -> int:
    """Bytes of the stored dense log-probs: windows x seq_len x vocab x 2, the windows
    counted from :data:`WIKITEXT2_TEST_TOKENS` (the plan has no tokenizer)."""
    windows = max(0, WIKITEXT2_TEST_TOKENS // seq_len - window_start)
    if max_windows is not None:
        windows = min(windows, max_windows)
    return windows * seq_len * card.vocab * STORED_ITEMSIZE
