"""The data stage through the runner, on the tiny Llama's byte tokenizer (one token per UTF-8
byte, no special tokens), so token counts can be checked without the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recoup.orchestrator.runner import StageFailedError, run_pipeline
from recoup.stages import data as data_stage
from recoup.stages.model.tokenize import tokenize_pair
from recoup.stages.text.datasources import Sample, alpaca_prompt
from recoup.stages.text.triplets import MiniLMEncoder, Triplet, read_parquet
from tests.conftest import tiny_config

MAX_LENGTH = 384
NUM_SAMPLES = 10


def _config(run_dir: Path, data_dir: Path, source: dict, **data: object):  # noqa: ANN202
    return tiny_config(run_dir, data_dir, run={"pipeline": ["prepare", "data"]},
                       data={"source": source, "max_length": MAX_LENGTH, **data})


def _run(cfg):  # noqa: ANN001, ANN202
    return run_pipeline(cfg, progress=False, echo=lambda _: None)


def _alpaca(num_samples: int = NUM_SAMPLES, seed: int = 42) -> dict:
    return {"source": "alpaca", "path": "alpaca/train.jsonl", "num_samples": num_samples,
            "seed": seed}


@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("data") / "run"
    _run(_config(run_dir, data_dir, _alpaca()))
    return run_dir


def test_alpaca_samples_skip_over_long_ones_and_keep_the_count(alpaca_run: Path,
                                                               data_dir: Path) -> None:
    samples = read_parquet(alpaca_run / "data" / data_stage.SAMPLES, Sample)
    assert len(samples) == NUM_SAMPLES and len({s.id for s in samples}) == NUM_SAMPLES
    records = [json.loads(line) for line in
               (data_dir / "alpaca" / "train.jsonl").read_text().splitlines() if line.strip()]
    n_bytes = [len((alpaca_prompt(r["instruction"], r.get("input", "")) + r["output"]).encode())
               for r in records]
    for s in samples:
        r = records[int(s.id.split("#")[1])]
        assert s.prompt == alpaca_prompt(r["instruction"], r.get("input", ""))
        assert s.response == r["output"]
        assert len((s.prompt + s.response).encode()) + 1 <= MAX_LENGTH  # + EOS
    info = json.loads((alpaca_run / "data" / data_stage.INFO).read_text())
    assert info["max_length"] == MAX_LENGTH and info["samples"] == NUM_SAMPLES
    assert info["skipped_too_long"] == sum(n + 1 > MAX_LENGTH for n in n_bytes) > 0  # + EOS


def test_negative_is_the_most_similar_other_response(alpaca_run: Path) -> None:
    samples = read_parquet(alpaca_run / "data" / data_stage.SAMPLES, Sample)
    rows = read_parquet(alpaca_run / "data" / data_stage.TRIPLETS, Triplet)
    assert [t.id for t in rows] == [s.id for s in samples]
    emb = MiniLMEncoder().encode([s.response for s in samples])  # (N, 384), unit rows
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    by_id = {s.id: s for s in samples}
    for i, t in enumerate(rows):
        assert t.negative_id != t.id
        assert t.prompt == samples[i].prompt and t.positive == samples[i].response
        assert t.negative == by_id[t.negative_id].response
        assert samples[int(sim[i].argmax())].id == t.negative_id
        assert t.similarity == pytest.approx(float(sim[i].max()), abs=1e-5)


def test_same_seed_same_samples_other_seed_other_samples(tmp_path: Path, data_dir: Path,
                                                         alpaca_run: Path) -> None:
    first = read_parquet(alpaca_run / "data" / data_stage.SAMPLES, Sample)
    _run(_config(tmp_path / "a", data_dir, _alpaca(), triplets=False))
    again = read_parquet(tmp_path / "a" / "data" / data_stage.SAMPLES, Sample)
    assert again == first
    assert not (tmp_path / "a" / "data" / data_stage.TRIPLETS).exists()
    _run(_config(tmp_path / "b", data_dir, _alpaca(seed=7), triplets=False))
    other = read_parquet(tmp_path / "b" / "data" / data_stage.SAMPLES, Sample)
    assert {s.id for s in other} != {s.id for s in first}


def test_plain_text_gives_lm_samples_and_refuses_triplets(tmp_path: Path,
                                                          data_dir: Path) -> None:
    text = {"source": "text", "path": "wikitext2/wiki.test.raw", "num_samples": 4,
            "chunk_chars": 200}
    _run(_config(tmp_path / "t", data_dir, text, triplets=False))
    samples = read_parquet(tmp_path / "t" / "data" / data_stage.SAMPLES, Sample)
    assert len(samples) == 4 and all(s.response == "" and s.prompt for s in samples)
    with pytest.raises(StageFailedError, match="set data.triplets: false"):
        _run(_config(tmp_path / "u", data_dir, text, triplets=True))


def test_local_jsonl_relative_to_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "mydata"
    data_dir.mkdir()
    rows = [{"q": f"question {i}?", "a": f"answer number {i}."} for i in range(6)]
    rows.append({"q": "long " * 100, "a": "too long to fit"})
    (data_dir / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = {"source": "jsonl", "path": "qa.jsonl", "prompt_field": "q", "response_field": "a"}
    out = _run(_config(tmp_path / "r", data_dir, source, triplets=False))
    assert out.metrics["data"]["skipped_too_long"] == 1
    samples = read_parquet(tmp_path / "r" / "data" / data_stage.SAMPLES, Sample)
    assert [s.id for s in samples] == [f"qa.jsonl#{i}" for i in range(6)]
    assert samples[2].prompt == "question 2?" and samples[2].response == "answer number 2."
    seq = tokenize_pair(_ByteTok(), samples[2].prompt, samples[2].response)
    assert seq.response_start == len(b"question 2?")
    with pytest.raises(StageFailedError, match="only 6 of the 7 samples fit"):
        _run(_config(tmp_path / "s", data_dir, {**source, "num_samples": 7}, triplets=False))


class _ByteTok:
    """The byte tokenizer's rule without the tokenizer: one id per UTF-8 byte."""

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict:
        return {"input_ids": [list(t.encode()) for t in texts]}


def test_tokenize_pair_keeps_the_prompt_tokens_of_every_view() -> None:
    tok = _ByteTok()
    pos = tokenize_pair(tok, "Q:", "yes")
    neg = tokenize_pair(tok, "Q:", "no, not at all", max_length=6)
    assert pos.ids[:pos.response_start] == neg.ids[:neg.response_start] == tuple(b"Q:")
    assert len(neg.ids) == 6 and neg.ids[2:] == tuple(b"no, ")
