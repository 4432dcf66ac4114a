"""Zero-shot task scoring through lm-evaluation-harness."""
