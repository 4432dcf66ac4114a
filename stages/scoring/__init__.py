"""Scoring models: zero-shot tasks through lm-evaluation-harness, WikiText-2 perplexity
and KL windows, and the one definition of the gap closed."""
