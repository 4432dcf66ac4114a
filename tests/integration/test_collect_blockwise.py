"""Block-by-block capture (stages/model/block_capture.py), what collect workers run, against
the whole-model capture it replaced (capture.capture_sequences) on a tiny random Llama
saved to disk: the same rows bit for bit on the CPU, in float32 and bfloat16, whatever the
padding side, position and batch size, from a single or a sharded safetensors save; never
more than one decoder block materialized; mismatched or missing weights named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recoup.stages.model import block_capture, capture, modelio
from recoup.stages.model.block_capture import BlockWeights
from recoup.stages.model.tokenize import TokenSeq

TINY = modelio.TinyLlamaConfig(layers=3, hidden=64, heads=4, kv_heads=2)
PAD = 2
#: (prompt tokens, response tokens): mixed lengths, so batches are padded
SHAPES = [(5, 3), (9, 0), (3, 7), (12, 4), (7, 1), (20, 6), (2, 0)]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tok = modelio.build_tiny_llama(TINY, torch.float32)
    folder = tmp_path_factory.mktemp("blockwise") / "model"
    modelio.save_model(model, tok, folder)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model saved in several safetensors files with an index."""
    model, _ = modelio.build_tiny_llama(TINY, torch.float32)
    folder = tmp_path_factory.mktemp("blockwise") / "sharded"
    model.save_pretrained(folder, max_shard_size="60KB")
    assert (folder / block_capture.INDEX_FILE).is_file()
    return folder


@pytest.fixture(scope="module")
def seqs() -> list[TokenSeq]:
    g = torch.Generator().manual_seed(0)
    return [TokenSeq(ids=tuple(torch.randint(3, 250, (p + r,), generator=g).tolist()),
                     response_start=p) for p, r in SHAPES]


def _both(folder: Path, seqs: list[TokenSeq], dtype: torch.dtype, device: torch.device,
          **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole-model rows, block-by-block rows), each (L, N, W)."""
    whole = capture.capture_sequences(modelio.load_model(folder, dtype, str(device)), seqs,
                                      pad_id=PAD, **kw)
    blocks = block_capture.capture_blockwise(BlockWeights(folder, dtype), seqs, pad_id=PAD,
                                             device=device, **kw)
    return whole, blocks


@pytest.mark.parametrize(("dtype", "side", "position"), [
    (torch.float32, "left", "last_token"), (torch.float32, "right", "mean_response"),
    (torch.bfloat16, "right", "last_token"), (torch.bfloat16, "left", "mean_response")])
def test_rows_equal_the_whole_model_capture(saved: Path, seqs: list[TokenSeq],
                                            dtype: torch.dtype, side: str,
                                            position: str) -> None:
    whole, blocks = _both(saved, seqs, dtype, CPU, batch_size=3, padding_side=side,
                          position=position)
    assert blocks.shape == (TINY.layers, len(seqs), TINY.hidden)
    assert blocks.dtype == torch.float32
    assert torch.equal(blocks, whole)


@pytest.mark.parametrize("batch_size", [2, 16])
def test_from_a_sharded_save_at_any_batch_size(sharded: Path, seqs: list[TokenSeq],
                                               batch_size: int) -> None:
    whole, blocks = _both(sharded, seqs, torch.float32, CPU, batch_size=batch_size,
                          padding_side="right", position="last_token")
    assert torch.equal(blocks, whole)


def test_one_block_materialized_at_a_time(saved: Path, seqs: list[TokenSeq]) -> None:
    weights = BlockWeights(saved, torch.float32)
    layers = weights.decoder.layers
    seen: list[int] = []

    def count(_m: torch.nn.Module, _a: object) -> None:
        seen.append(sum(not next(layer.parameters()).is_meta for layer in layers))

    handles = [layer.register_forward_pre_hook(count) for layer in layers]
    try:
        block_capture.capture_blockwise(weights, seqs, batch_size=3, pad_id=PAD,
                                        padding_side="right", position="last_token",
                                        device=CPU)
    finally:
        for h in handles:
            h.remove()
    assert seen and set(seen) == {1}
    assert all(p.is_meta for p in weights.decoder.parameters())  # nothing left behind


def test_weights_are_the_files_pages_not_copies(tmp_path: Path) -> None:
    """What collect's plan assumes (``estimate_collect``): a block's weights (and the
    embedding, read the same way), read through ``safe_open``, are the safetensors file's
    mmap'ed pages (page cache), not private copies: reading a ~67 MB block on the CPU grows
    the private memory (``RssAnon``) by far less, and touching every weight moves the
    file-backed resident set."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads /proc/self/status")

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def shared() -> int:  # a file on tmpfs is counted as shmem
        return status("RssFile:") + status("RssShmem:")

    config = modelio.TinyLlamaConfig(layers=1, hidden=1024, heads=8, kv_heads=8,
                                     intermediate=4096)
    model, tok = modelio.build_tiny_llama(config, torch.float32)
    modelio.save_model(model, tok, tmp_path / "model")
    del model
    weights = BlockWeights(tmp_path / "model", torch.float32)
    anon, file = status("RssAnon:"), shared()
    with weights.block(0, CPU) as block:
        block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
        total = sum(float(p.sum()) for p in block.parameters())  # touches every page
        grew_anon, grew_file = status("RssAnon:") - anon, shared() - file
    assert block_bytes > 60e6 and total == total
    assert grew_anon < block_bytes // 4
    assert grew_file > block_bytes // 2


def test_a_different_architecture_is_named(saved: Path, tmp_path: Path) -> None:
    other, tok = modelio.build_tiny_llama(TINY.model_copy(update={"intermediate": 96}),
                                          torch.float32)
    modelio.save_model(other, tok, tmp_path / "other")
    with pytest.raises(ValueError, match=r"other: tensor model\.layers\.0\.mlp\..* has shape"):
        block_capture.check_same_architecture(BlockWeights(saved, torch.float32),
                                              BlockWeights(tmp_path / "other", torch.float32))


def test_a_folder_without_safetensors_is_named(saved: Path, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'm'}: neither model.safetensors"):
        BlockWeights(tmp_path / "m", torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_a_gpu_rows_match_the_whole_model_capture(saved: Path, seqs: list[TokenSeq],
                                                     dtype: torch.dtype) -> None:
    whole, blocks = _both(saved, seqs, dtype, torch.device("cuda"), batch_size=3,
                          padding_side="right", position="mean_response")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(blocks, whole, rtol=tol, atol=tol)
