"""Sparsity of a saved model, read from its safetensors files (no model is built)."""

from __future__ import annotations

from pathlib import Path


def linear_sparsity(folder: Path) -> dict[str, float]:
    """Fraction of exact zeros in the decoder blocks' linear weights (the matrices recoup
    degrades: 2-D tensors under ``model.layers.``), read from the safetensors files; an
    unmerged adapter's file (``adapter_model.safetensors``) is not counted."""
    from safetensors import safe_open

    zeros = total = 0
    for path in sorted(folder.glob("*.safetensors")):
        if path.name.startswith("adapter_"):
            continue  # an unmerged (dense, low-rank) adapter is not the pruned weights
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if ".layers." not in name or len(f.get_slice(name).get_shape()) != 2:
                    continue
                w = f.get_tensor(name)
                zeros += int((w == 0).sum())
                total += w.numel()
    if total == 0:
        raise ValueError(f"{folder}: no decoder linear weights found in its safetensors files")
    return {"linear_sparsity": zeros / total, "linear_params": total}
