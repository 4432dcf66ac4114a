"""Compression math (pruning, fake quantization) and the block-by-block driver."""
