"""Unit tests for the data sources: exact prompt text, seeded subsets, errors people can read."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from recoup.stages.text import datasources as ds
from recoup.stages.text.datasources import (
    AlpacaSourceConfig,
    HfSourceConfig,
    JsonlSourceConfig,
    Sample,
    SourceConfig,
    TextSourceConfig,
    load_samples,
)

ALPACA_RECORDS = 2000  # alpaca/train.jsonl, see the data folder's SOURCES.md


def _data_dir() -> Path:
    """$RECOUP_DATA_DIR, else ../shared/data beside the repository root."""
    env = os.environ.get("RECOUP_DATA_DIR")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="module")
def alpaca_path() -> Path:
    path = _data_dir() / "alpaca" / "train.jsonl"
    if not path.is_file():
        pytest.fail(f"data file {path} not found (set RECOUP_DATA_DIR)")
    return path


@pytest.fixture(scope="module")
def wikitext_path() -> Path:
    path = _data_dir() / "wikitext2" / "wiki.test.raw"
    if not path.is_file():
        pytest.fail(f"data file {path} not found (set RECOUP_DATA_DIR)")
    return path


def _write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- alpaca


def test_alpaca_template_exact_text(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Sort these.", "input": "b, a", "output": "a, b"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Say bye.", "output": "Bye!"},  # no input key at all
        ],
    )
    s = load_samples(AlpacaSourceConfig(path=path))
    assert s[0] == Sample(
        id="a.jsonl#0",
        prompt="Below is an instruction that describes a task, paired with an input that "
        "provides further context. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSort these.\n\n### Input:\nb, a\n\n### Response:",
        response="a, b",
    )
    assert s[1] == Sample(
        id="a.jsonl#1",
        prompt="Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:",
        response="Hi!",
    )
    assert s[2].prompt.endswith("### Instruction:\nSay bye.\n\n### Response:")
    assert "### Input:" not in s[2].prompt


def test_alpaca_real_file_prompts(alpaca_path: Path) -> None:
    records = [json.loads(line) for line in alpaca_path.read_text().splitlines()]
    samples = load_samples(AlpacaSourceConfig(path=alpaca_path))
    assert len(samples) == ALPACA_RECORDS
    with_input = next(i for i, r in enumerate(records) if r["input"])
    without = next(i for i, r in enumerate(records) if not r["input"])
    r, s = records[with_input], samples[with_input]
    assert s.id == f"train.jsonl#{with_input}"
    assert s.prompt.endswith(
        f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:"
    )
    assert s.response == r["output"]
    assert samples[without].prompt.startswith(
        "Below is an instruction that describes a task. Write a response"
    )


def test_seeded_subset_is_deterministic(alpaca_path: Path) -> None:
    a = load_samples(AlpacaSourceConfig(path=alpaca_path, num_samples=50, seed=1))
    b = load_samples(AlpacaSourceConfig(path=alpaca_path, num_samples=50, seed=1))
    c = load_samples(AlpacaSourceConfig(path=alpaca_path, num_samples=50, seed=2))
    assert a == b
    assert len(a) == 50 and len({s.id for s in a}) == 50
    assert {s.id for s in a} != {s.id for s in c}
    indices = [int(s.id.split("#")[1]) for s in a]
    assert indices == sorted(indices)  # file order
    smaller = load_samples(AlpacaSourceConfig(path=alpaca_path, num_samples=20, seed=1))
    assert {s.id for s in smaller} <= {s.id for s in a}


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=r"nope\.jsonl does not exist"):
        load_samples(AlpacaSourceConfig(path=missing))


def test_empty_file_names_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no records"):
        load_samples(AlpacaSourceConfig(path=empty))


def test_too_few_samples_names_file_and_counts(alpaca_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        load_samples(AlpacaSourceConfig(path=alpaca_path, num_samples=ALPACA_RECORDS + 1))
    msg = str(e.value)
    assert str(alpaca_path) in msg and "2000 usable" in msg and "2001 asked" in msg


def test_empty_responses_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"instruction": "a", "input": "", "output": "x"},
            {"instruction": "b", "input": "", "output": "  "},
            {"instruction": "c", "input": "", "output": "z"},
        ],
    )
    with caplog.at_level(logging.WARNING, logger=ds.__name__):
        samples = load_samples(AlpacaSourceConfig(path=path))
    assert [s.id for s in samples] == ["s.jsonl#0", "s.jsonl#2"]
    assert "skipped 1 of 3" in caplog.text
    with pytest.raises(ValueError, match=r"2 usable samples .*1 skipped.*3 asked"):
        load_samples(AlpacaSourceConfig(path=path, num_samples=3))


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2 is not JSON"):
        load_samples(AlpacaSourceConfig(path=path))


# --------------------------------------------------------------------------- registry, configs


def test_unknown_source_lists_known_ones() -> None:
    known = "alpaca, hf, jsonl, synthetic, text"
    with pytest.raises(ValueError, match=rf"unknown data source 'nope'.*{known}"):
        ds.get_source("nope")
    with pytest.raises(ValueError, match=r"'nope'"):
        ds.parse_source_config({"source": "nope", "path": "x"})
    with pytest.raises(ValueError, match=r"needs a 'source' key"):
        ds.parse_source_config({"path": "x"})


def test_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match=r"'alpaca' is registered twice"):
        ds.register_source("alpaca", AlpacaSourceConfig)(lambda cfg: [])
    assert ds.source_names() == ["alpaca", "hf", "jsonl", "synthetic", "text"]


def test_configs_are_strict_and_frozen(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="pathh"):
        AlpacaSourceConfig(path=tmp_path, pathh=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        AlpacaSourceConfig(path=tmp_path, num_samples=0)
    cfg = AlpacaSourceConfig(path=tmp_path)
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]
    assert all(f.description for f in HfSourceConfig.model_fields.values())


def test_config_from_mapping_picks_the_source_class() -> None:
    data = {"source": "jsonl", "path": "x.jsonl", "prompt_field": "q"}
    cfg = ds.parse_source_config(data)
    assert isinstance(cfg, JsonlSourceConfig) and cfg.prompt_field == "q"
    assert TypeAdapter(SourceConfig).validate_python(data) == cfg


# --------------------------------------------------------------------------- jsonl, hf, text


def test_jsonl_field_mapping(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "qa.jsonl",
        [{"q": "What is 2+2?", "a": " 4", "extra": 1}, {"q": "Capital of France?", "a": " Paris"}],
    )
    cfg = JsonlSourceConfig(path=path, prompt_field="q", response_field="a")
    assert load_samples(cfg) == [
        Sample(id="qa.jsonl#0", prompt="What is 2+2?", response=" 4"),
        Sample(id="qa.jsonl#1", prompt="Capital of France?", response=" Paris"),
    ]
    with pytest.raises(ValueError, match=r"record 0 of .*qa\.jsonl has no field 'prompt'"):
        load_samples(JsonlSourceConfig(path=path))


def test_hf_json_builder_matches_alpaca_source(alpaca_path: Path, tmp_path: Path) -> None:
    common = {"num_samples": 64, "seed": 3}
    hf = HfSourceConfig(
        name="json",
        data_files=str(alpaca_path),
        split="train",
        format="alpaca",
        cache_dir=tmp_path / "hf-cache",
        **common,
    )
    assert load_samples(hf) == load_samples(AlpacaSourceConfig(path=alpaca_path, **common))


def test_hf_field_mapping_and_missing_file(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"q": "x", "a": "y"}, {"q": "u", "a": ""}])
    cfg = HfSourceConfig(
        name="json",
        data_files=[str(path)],
        prompt_field="q",
        response_field="a",
        cache_dir=tmp_path / "hf-cache",
    )
    assert load_samples(cfg) == [Sample(id="qa.jsonl#0", prompt="x", response="y")]
    gone = HfSourceConfig(name="json", data_files=str(tmp_path / "gone.jsonl"))
    with pytest.raises(ValueError, match=r"gone\.jsonl does not exist"):
        load_samples(gone)


def test_text_source_on_wikitext(wikitext_path: Path) -> None:
    cfg = TextSourceConfig(path=wikitext_path, chunk_chars=4096, num_samples=8, seed=0)
    samples = load_samples(cfg)
    assert len(samples) == 8
    assert all(s.response == "" and 0 < len(s.prompt) <= 4096 for s in samples)
    first = load_samples(TextSourceConfig(path=wikitext_path, chunk_chars=4096))[0]
    assert first.id == "wiki.test.raw#0" and first.prompt.startswith("= Robert Boulter =\n\n")


def test_synthetic_source_keeps_the_generator_ids(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"synthetic#{i}", "prompt": f"p{i}", "response": f"r{i}"}
            for i in (0, 2, 3, 7)]  # gaps: dropped duplicates keep their numbers out
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "synthetic.parquet")
    cfg = ds.SyntheticSourceConfig(path=tmp_path / "synthetic.parquet")
    assert [s.id for s in ds.load_samples(cfg)] == [r["id"] for r in rows]
    sub = ds.load_samples(cfg.model_copy(update={"num_samples": 2}))
    assert len(sub) == 2 and {s.id for s in sub} <= {r["id"] for r in rows}
    assert all(s.prompt == "p" + s.id.split("#")[1] for s in sub)
    with pytest.raises(ValueError, match="fewer than the 9"):
        ds.load_samples(cfg.model_copy(update={"num_samples": 9}))
    with pytest.raises(ValueError, match="no path"):
        ds.load_samples(ds.SyntheticSourceConfig())
