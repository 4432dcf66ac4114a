"""Layer ranking: relative output errors per layer and the pick of the largest."""

from __future__ import annotations

import torch

from recoup.stages.recovery.layer_ranking import layer_output_errors, top_layers


def test_layer_errors_and_top_layers() -> None:
    d = [torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.ones(1, 2, 3)]
    g = [torch.ones(1, 2, 3), torch.zeros(1, 2, 3), 1.5 * torch.ones(1, 2, 3)]
    errs = layer_output_errors(d, g)
    torch.testing.assert_close(errs, torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64))
    assert top_layers(errs, 2) == [1, 2]
    mask = torch.tensor([[1, 0]])
    g[0] = torch.cat([torch.ones(1, 1, 3), 9 * torch.ones(1, 1, 3)], dim=1)  # only the pad moved
    assert float(layer_output_errors(d, g, mask)[0]) == 0.0
