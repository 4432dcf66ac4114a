"""Config loading: overrides, and errors that name the key and where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from recoup.orchestrator.config import (
    ADDED_FIELD,
    ConfigError,
    StrictModel,
    diff_configs,
    fingerprint_dump,
    load_config,
    parse_override,
    yaml_load,
)
from recoup.orchestrator.runconfig import RunConfig

BASE = """
run:
  dir: {dir}
prepare:
  source: tiny-llama
degrade:
  method: magnitude
  sparsity: 0.5
"""


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(BASE.format(dir=tmp_path / "run"))
    return p


def test_overrides_are_typed_and_nested(cfg_file: Path) -> None:
    cfg = load_config(RunConfig, cfg_file,
                      ["degrade.sparsity=0.6", "degrade.pattern=2:4", "evaluate.max_windows=3"])
    assert cfg.degrade.sparsity == 0.6
    assert cfg.degrade.pattern == "2:4"
    assert cfg.degrade.nm == (2, 4)
    assert cfg.evaluate.max_windows == 3


def test_nm_pattern_is_not_read_as_a_base60_number() -> None:
    assert yaml_load("p: 2:4\nq: 4:8\nn: 12\nh: 0x10") == {"p": "2:4", "q": "4:8", "n": 12, "h": 16}


def test_unknown_key_in_file_names_file_and_key(cfg_file: Path) -> None:
    cfg_file.write_text(cfg_file.read_text() + "  sparsty: 0.3\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, cfg_file)
    assert f"{cfg_file}: unknown key 'degrade.sparsty'" in str(e.value)


def test_wrong_type_and_range_from_override_name_the_override(cfg_file: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, cfg_file, ["evaluate.seq_len=abc", "degrade.sparsity=1.5"])
    text = str(e.value)
    assert "override 'evaluate.seq_len=abc': evaluate.seq_len:" in text
    assert "override 'degrade.sparsity=1.5': degrade.sparsity: Input should be less than 1" in text


@pytest.mark.parametrize("pattern,needle", [("4:2", "0 < N < M"), ("2-4", "N:M")])
def test_bad_nm_pattern(cfg_file: Path, pattern: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(RunConfig, cfg_file, [f"degrade.pattern={pattern}"])


def test_missing_required_key_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("prepare:\n  source: tiny-llama\n")
    with pytest.raises(ConfigError, match="required key 'run' is missing"):
        load_config(RunConfig, p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("degrade.sparsity")
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("degrade..x=1")


def test_override_into_a_value_is_an_error(cfg_file: Path) -> None:
    with pytest.raises(ConfigError, match="degrade.method is a value"):
        load_config(RunConfig, cfg_file, ["degrade.method.x=1"])


def test_configs_are_frozen(cfg_file: Path) -> None:
    cfg = load_config(RunConfig, cfg_file)
    with pytest.raises(Exception, match="frozen"):
        cfg.degrade.sparsity = 0.9  # type: ignore[misc]


def test_diff_configs_lists_changed_values() -> None:
    old = {"sparsity": 0.5, "cal": {"n": 1, "seed": 0}}
    new = {"sparsity": 0.6, "cal": {"n": 1, "seed": 1}, "extra": True}
    assert diff_configs(old, new, prefix="degrade.") == [
        "degrade.cal.seed: 0 -> 1",
        "degrade.extra: '(unset)' -> True",
        "degrade.sparsity: 0.5 -> 0.6",
    ]


def test_shipped_configs_validate() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        load_config(RunConfig, f)


class _Inner(StrictModel):
    kept: int = 1
    added: str = Field("old", json_schema_extra=ADDED_FIELD)


class _Section(StrictModel):
    inner: _Inner = _Inner()
    added: int = Field(0, json_schema_extra=ADDED_FIELD)
    plain: int = 0


def test_a_field_added_at_its_default_leaves_the_fingerprint_as_it_was() -> None:
    # what a run made before the fields existed hashed
    assert fingerprint_dump(_Section()) == {"inner": {"kept": 1}, "plain": 0}
    # set to anything else, an added field counts like any other, nested or not
    assert fingerprint_dump(_Section(added=2, inner=_Inner(added="new"))) == {
        "inner": {"kept": 1, "added": "new"}, "added": 2, "plain": 0}
    assert diff_configs(fingerprint_dump(_Section()), fingerprint_dump(_Section(added=2))) == [
        "added: '(unset)' -> 2"]


def test_synthesize_dtype_at_its_default_keeps_earlier_runs_and_their_shards() -> None:
    from recoup.stages.synthesize import SynthesizeConfig, shard_key

    assert "dtype" not in fingerprint_dump(SynthesizeConfig())
    assert fingerprint_dump(SynthesizeConfig(dtype="bfloat16"))["dtype"] == "bfloat16"
    key = shard_key(SynthesizeConfig(), device="cpu", upstream="u")
    assert key == shard_key(SynthesizeConfig(dtype="model"), device="cpu", upstream="u")
    assert key != shard_key(SynthesizeConfig(dtype="bfloat16"), device="cpu", upstream="u")
