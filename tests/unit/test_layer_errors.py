"""Layer sensitivity: the damaged layer is found under every normalisation, and the three
normalisations share one numerator."""

from __future__ import annotations

import copy

import pytest
import torch

from recoup.stages.model import modelio
from recoup.stages.model.layer_errors import ranking
from recoup.stages.recovery.batching import collate
from recoup.stages.recovery.layer_ranking import local_layer_io, rank_layers


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    dense, _ = modelio.build_tiny_llama(modelio.TinyLlamaConfig(layers=3), torch.float32)
    degraded = copy.deepcopy(dense)
    with torch.no_grad():  # layer 1 badly damaged, layer 2 a little
        degraded.model.layers[1].mlp.down_proj.weight.mul_(-1.0)
        degraded.model.layers[2].mlp.down_proj.weight.mul_(0.9)
    return dense, degraded


def _batches() -> list[dict[str, torch.Tensor]]:
    from recoup.stages.recovery.batching import Encoded

    gen = torch.Generator().manual_seed(0)
    samples = [Encoded(ids=tuple(torch.randint(3, 200, (n,), generator=gen).tolist()),
                       prompt_len=2) for n in (9, 5, 7)]
    return [collate(samples, pad_id=2)]


@pytest.mark.parametrize("normalize", ["output", "update", "none"])
def test_the_damaged_layer_ranks_first(models: tuple, normalize: str) -> None:
    errors = rank_layers(*models, _batches(), normalize)  # type: ignore[arg-type]
    assert errors.shape == (3,)
    assert errors[0] == 0  # untouched layer fed the dense input: no error at all
    assert ranking(errors.tolist())[:2] == [1, 2]


def test_normalisations_share_the_squared_error(models: tuple) -> None:
    batch = _batches()[0]
    x, d, _ = local_layer_io(*models, batch)
    mask = batch["attention_mask"].bool()
    tokens = float(mask.sum())
    out = rank_layers(*models, [batch], "output")
    upd = rank_layers(*models, [batch], "update")
    none = rank_layers(*models, [batch], "none")
    for i in range(3):
        out_norm = float((d[i].double() ** 2).sum(-1)[mask].sum())
        upd_norm = float(((d[i] - x[i]).double() ** 2).sum(-1)[mask].sum())
        assert float(out[i]) * out_norm == pytest.approx(float(none[i]) * tokens, abs=1e-9)
        assert float(upd[i]) * upd_norm == pytest.approx(float(none[i]) * tokens, abs=1e-9)


@pytest.mark.parametrize("normalize", ["output", "update", "none"])
def test_block_by_block_gives_the_whole_model_errors(models: tuple, normalize: str,
                                                     tmp_path) -> None:
    """measure_layer_errors reads one block of each saved model at a time (the two models
    never resident): the same errors as both whole models in memory, over uneven batches."""
    from recoup.stages.model.layer_errors import measure_layer_errors
    from recoup.stages.recovery.batching import Encoded

    dense, degraded = models
    tok = modelio.byte_tokenizer()
    modelio.save_model(dense, tok, tmp_path / "dense")
    modelio.save_model(degraded, tok, tmp_path / "degraded")
    gen = torch.Generator().manual_seed(1)
    samples = [Encoded(ids=tuple(torch.randint(3, 200, (n,), generator=gen).tolist()),
                       prompt_len=2) for n in (9, 5, 7, 12, 3)]
    whole = rank_layers(dense, degraded, [collate(samples[i:i + 2], 2) for i in (0, 2, 4)],
                        normalize)  # type: ignore[arg-type]
    blocks = measure_layer_errors(tmp_path / "dense", tmp_path / "degraded", "float32", "cpu",
                                  samples, 2, 2, normalize)  # type: ignore[arg-type]
    assert blocks.device.type == "cpu" and blocks.shape == (3,)
    torch.testing.assert_close(blocks, whole.double(), rtol=1e-5, atol=1e-12)
