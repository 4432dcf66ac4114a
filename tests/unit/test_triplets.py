"""Unit tests for triplet mining: blockwise hardest negatives against the full similarity
matrix, the MiniLM encoder's contract, and atomic Parquet files with an explicit schema."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from recoup.stages.text.datasources import AlpacaSourceConfig, Sample, load_samples
from recoup.stages.text.triplets import (
    SAMPLE_SCHEMA,
    TRIPLET_SCHEMA,
    MiniLMEncoder,
    Triplet,
    build_triplets,
    hardest_negatives,
    read_parquet,
    write_parquet,
)


def _data_dir() -> Path:
    """$RECOUP_DATA_DIR, else ../shared/data beside the repository root."""
    env = os.environ.get("RECOUP_DATA_DIR")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


def _unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)  # (n, d)


def _brute_force(emb: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    sim = F.normalize(emb, dim=1) @ F.normalize(emb, dim=1).T  # (N, N)
    if groups is None:
        sim.fill_diagonal_(float("-inf"))
    else:
        sim.masked_fill_(groups[:, None] == groups[None, :], float("-inf"))
    return sim.argmax(dim=1)


class _LookupEncoder:
    """A SentenceEncoder for tests: fixed embeddings per text."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def encode(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(torch.tensor([self.table[t] for t in texts]), dim=1)


# --------------------------------------------------------------------------- mining


@pytest.mark.parametrize("block", [1, 5, 16, 36, 37, 100])
def test_hardest_negatives_match_full_matrix(block: int) -> None:
    emb = _unit_rows(37, 8, seed=0)
    got = hardest_negatives(emb, block)
    assert got.dtype == torch.long and got.shape == (37,)
    assert torch.equal(got, _brute_force(emb))
    assert not (got == torch.arange(37)).any()


@pytest.mark.parametrize("block", [1, 2, 5])
def test_ties_go_to_the_lowest_index(block: int) -> None:
    a, b, c = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    emb = torch.tensor([a, b, c, b, b])  # rows 1, 3, 4 identical; 0 and 2 orthogonal to all
    got = hardest_negatives(emb, block).tolist()
    assert got == [1, 3, 0, 1, 1]  # rows 0 and 2 tie with every other row at 0: lowest index


@pytest.mark.parametrize("block", [1, 7, 37])
def test_groups_are_never_their_own_negatives(block: int) -> None:
    emb = _unit_rows(37, 8, seed=1)
    groups = torch.arange(37) // 3  # rows 3k, 3k+1, 3k+2 share a group
    got = hardest_negatives(emb, block, groups)
    assert torch.equal(got, _brute_force(emb, groups))
    assert not (groups[got] == groups).any()
    with pytest.raises(ValueError, match="no allowed negative"):
        hardest_negatives(emb, block, torch.zeros(37, dtype=torch.long))


def test_hardest_negatives_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 rows"):
        hardest_negatives(torch.ones(1, 4))
    with pytest.raises(ValueError, match="2-D"):
        hardest_negatives(torch.ones(4))
    with pytest.raises(ValueError, match="batch_size"):
        hardest_negatives(torch.ones(3, 4), 0)
    with pytest.raises(ValueError, match="NaN"):
        hardest_negatives(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]))


def test_build_triplets_pairs_most_similar_other_response() -> None:
    samples = [
        Sample(id="s0", prompt="p0", response="apple"),
        Sample(id="s1", prompt="p1", response="pear"),
        Sample(id="s2", prompt="p2", response="car"),
        Sample(id="s3", prompt="p3", response="apple "),  # same text as s0 once stripped
    ]
    enc = _LookupEncoder(
        {"apple": [1, 0.1, 0], "apple ": [1, 0.1, 0], "pear": [1, 0.3, 0], "car": [0, 0.2, 1]}
    )
    got = build_triplets(samples, enc, batch_size=2)
    assert [t.negative_id for t in got] == ["s1", "s0", "s1", "s1"]
    t0 = got[0]
    assert t0 == Triplet(
        id="s0",
        prompt="p0",
        positive="apple",
        negative="pear",
        negative_id="s1",
        similarity=t0.similarity,
    )
    expected = float(F.cosine_similarity(torch.tensor([1, 0.1, 0]), torch.tensor([1, 0.3, 0]), 0))
    assert t0.similarity == pytest.approx(expected, abs=1e-6)


def test_build_triplets_refuses_what_it_cannot_pair() -> None:
    enc = _LookupEncoder({"a": [1.0, 0.0], "b": [0.0, 1.0]})
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        build_triplets([Sample("x", "p", "a")], enc)
    with pytest.raises(ValueError, match="no response"):
        build_triplets([Sample("x", "p", "a"), Sample("y", "text", "")], enc)
    with pytest.raises(ValueError, match="not unique"):
        build_triplets([Sample("x", "p", "a"), Sample("x", "q", "b")], enc)


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder(batch_size=8)


TEXTS = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The central bank raised interest rates by half a point.",
    "  Leading and trailing spaces are stripped.  ",
    "Short.",
    "A much longer sentence that goes on for a while, so that the batch has real padding "
    "in it when it is encoded next to the short ones, which is the point of this text.",
    "Cats sleep most of the day.",
    "Paris is the capital of France.",
    "1 2 3",
    "The quick brown fox jumps over the lazy dog.",
]


def test_minilm_embeddings_are_unit_norm(encoder: MiniLMEncoder) -> None:
    emb = encoder.encode(TEXTS)
    assert emb.shape == (len(TEXTS), 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert encoder.max_length == 256


def test_minilm_paraphrase_beats_unrelated(encoder: MiniLMEncoder) -> None:
    emb = encoder.encode(TEXTS[:3])
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.3


def test_minilm_batching_and_order_do_not_change_embeddings(encoder: MiniLMEncoder) -> None:
    batched = encoder.encode(TEXTS)
    encoder.batch_size = 1
    try:
        single = encoder.encode(TEXTS)
    finally:
        encoder.batch_size = 8
    assert torch.allclose(batched, single, atol=1e-5)
    reversed_ = encoder.encode(TEXTS[::-1])
    assert torch.allclose(reversed_.flip(0), batched, atol=1e-5)


@torch.no_grad()
def test_minilm_is_mean_pooling_over_the_mask(encoder: MiniLMEncoder) -> None:
    text = "Mean pooling takes the average of the token vectors."
    ids = encoder.tokenizer(text, return_tensors="pt")
    tokens = encoder.model(**ids).last_hidden_state[0]  # (T, 384), no padding
    expected = F.normalize(tokens.mean(dim=0), dim=0)
    assert torch.allclose(encoder.encode([text])[0], expected, atol=1e-5)


def test_minilm_triplets_on_alpaca(encoder: MiniLMEncoder) -> None:
    path = _data_dir() / "alpaca" / "train.jsonl"
    if not path.is_file():
        pytest.fail(f"data file {path} not found (set RECOUP_DATA_DIR)")
    samples = load_samples(AlpacaSourceConfig(path=path, num_samples=12, seed=0))
    triplets = build_triplets(samples, encoder, batch_size=5)
    assert [t.id for t in triplets] == [s.id for s in samples]
    assert all(t.negative_id != t.id and -1.0 <= t.similarity <= 1.0 for t in triplets)


# --------------------------------------------------------------------------- parquet


def test_parquet_round_trip_with_schema(tmp_path: Path) -> None:
    rows = [
        Triplet("a#0", "q0", "r0", "r1", "a#1", 0.5),
        Triplet("a#1", "q1 \u00e9\u4e2d", "r1", "r0", "a#0", -0.25),
    ]
    path = write_parquet(rows, tmp_path / "out" / "triplets.parquet")
    assert pq.read_schema(path).equals(TRIPLET_SCHEMA)
    assert read_parquet(path) == rows
    assert os.listdir(path.parent) == ["triplets.parquet"]  # no temporary left behind

    write_parquet(rows[:1], path)  # replaces the old file
    assert read_parquet(path) == rows[:1]

    samples = [Sample("a#0", "p", "r"), Sample("a#1", "text", "")]
    spath = write_parquet(samples, tmp_path / "samples.parquet")
    assert pq.read_schema(spath).equals(SAMPLE_SCHEMA)
    assert read_parquet(spath, Sample) == samples


def test_parquet_errors_name_the_file(tmp_path: Path) -> None:
    spath = write_parquet([Sample("a", "p", "r")], tmp_path / "samples.parquet")
    with pytest.raises(ValueError, match=r"samples\.parquet does not hold Triplet rows"):
        read_parquet(spath, Triplet)
    with pytest.raises(ValueError, match=r"gone\.parquet does not exist"):
        read_parquet(tmp_path / "gone.parquet")
    with pytest.raises(ValueError, match="no rows"):
        write_parquet([], tmp_path / "empty.parquet")
    assert not (tmp_path / "empty.parquet").exists()
