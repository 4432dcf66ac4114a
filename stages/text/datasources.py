"""Data sources for the ``data`` stage: text in, a deterministic list of :class:`Sample` out.

Every source is a loader function registered by name together with its typed, frozen config.
A loader only reads; sampling is one rule shared by all sources so that a run's samples
depend on (records, ``num_samples``, ``seed``) and nothing else:

* records are read in file order and numbered from 0; a record's id is ``"<label>#<index>"``
  (``label`` is the file name for local files), so two sources reading the same file give the
  same ids;
* records without a response are skipped for prompt/response sources (the loss masks the
  prompt, so a sample without a response trains nothing) and the count is logged;
* ``num_samples=None`` keeps every usable record; otherwise the first ``num_samples`` of a
  seeded shuffle of the usable records are kept, returned in file order. Because it is a
  prefix of one permutation, the subset for ``k`` samples contains the subset for ``k' < k``
  under the same seed.

The shared rules, :class:`Sample` and the source configs are in
:mod:`recoup.stages.text.samples` (re-exported here). Adding a source is one decorated
function, registered on :data:`SOURCES`::

    @register_source("mine", MineSourceConfig)
    def _load_mine(cfg: MineSourceConfig) -> list[Sample]: ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from recoup.orchestrator.registry import Registry
from recoup.stages.text.samples import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    DEFAULT_CHUNK_CHARS,
    DEFAULT_SEED,
    AlpacaSourceConfig,
    HfSourceConfig,
    JsonlSourceConfig,
    Sample,
    SourceConfig,
    SourceConfigBase,
    SyntheticSourceConfig,
    TextSourceConfig,
    alpaca_prompt,
    alpaca_rows,
    chunk_text,
    existing_file,
    field_rows,
    finish_rows,
    read_jsonl,
    seeded_subset,
    split_paragraphs,
)

# --------------------------------------------------------------------------- registry

ConfigT = TypeVar("ConfigT", bound=SourceConfigBase)
Loader = Callable[[ConfigT], list[Sample]]


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """A registered source: its config class and the function that loads it."""

    name: str
    config_cls: type[SourceConfigBase]
    loader: Callable[[Any], list[Sample]]


SOURCES: Registry[SourceEntry] = Registry(
    "data source", unknown="unknown data source {name!r}; known sources: {known}")


def register_source(
    name: str, config_cls: type[ConfigT]
) -> Callable[[Loader[ConfigT]], Loader[ConfigT]]:
    """Register a loader under ``name``; a second registration of a name is a bug, so refuse it.

    The config class must tag itself with ``source: Literal[name]`` so that a config read from
    YAML finds its loader.
    """

    def decorate(loader: Loader[ConfigT]) -> Loader[ConfigT]:
        tag = config_cls.model_fields.get("source")
        if tag is None or tag.default != name:
            raise ValueError(
                f"{config_cls.__name__} must declare source: Literal[{name!r}] = {name!r}"
            )
        SOURCES.add(name, SourceEntry(name=name, config_cls=config_cls, loader=loader))
        return loader

    return decorate


def source_names() -> list[str]:
    """The registered source names, sorted."""
    return list(SOURCES.names())


def get_source(name: str) -> SourceEntry:
    """Look a source up by name; an unknown name is an error that lists the known ones."""
    return SOURCES.get(name)


def parse_source_config(data: Mapping[str, Any]) -> SourceConfigBase:
    """Build the config of the source named by ``data['source']`` (e.g. a YAML mapping)."""
    if "source" not in data:
        raise ValueError(
            f"a data source config needs a 'source' key; known sources: {', '.join(source_names())}"
        )
    return get_source(str(data["source"])).config_cls.model_validate(dict(data))


def load_samples(cfg: SourceConfigBase) -> list[Sample]:
    """Load the samples a source config describes (see the module docstring for the rules)."""
    name = getattr(cfg, "source", None)
    entry = get_source(str(name))
    if not isinstance(cfg, entry.config_cls):
        raise TypeError(
            f"data source {name!r} takes a {entry.config_cls.__name__}, got a {type(cfg).__name__}"
        )
    return entry.loader(cfg)


# --------------------------------------------------------------------------- sources


@register_source("alpaca", AlpacaSourceConfig)
def _load_alpaca(cfg: AlpacaSourceConfig) -> list[Sample]:
    """Alpaca jsonl: the Stanford template as the prompt, ``output`` as the response."""
    path = existing_file("alpaca", cfg.path)
    rows = alpaca_rows("alpaca", str(path), read_jsonl("alpaca", path))
    return finish_rows("alpaca", str(path), path.name, rows, cfg, need_response=True)


@register_source("jsonl", JsonlSourceConfig)
def _load_jsonl(cfg: JsonlSourceConfig) -> list[Sample]:
    """Any jsonl: prompt and response taken verbatim from the configured fields."""
    path = existing_file("jsonl", cfg.path)
    records = read_jsonl("jsonl", path)
    rows = field_rows("jsonl", str(path), records, cfg.prompt_field, cfg.response_field)
    return finish_rows("jsonl", str(path), path.name, rows, cfg, need_response=True)


@register_source("text", TextSourceConfig)
def _load_text(cfg: TextSourceConfig) -> list[Sample]:
    """Plain text as prompt-less LM samples: the chunk is the prompt, the response is empty."""
    path = existing_file("text", cfg.path)
    chunks = chunk_text(path.read_text(encoding="utf-8"), cfg.chunk_chars)
    rows = ((i, chunk, "") for i, chunk in enumerate(chunks))
    return finish_rows("text", str(path), path.name, rows, cfg, need_response=False)


@register_source("synthetic", SyntheticSourceConfig)
def _load_synthetic(cfg: SyntheticSourceConfig) -> list[Sample]:
    """The synthesize stage's samples file, its ids (``synthetic#N``) kept as written.

    Any Parquet file with string columns id, prompt and response will do (others ignored).
    """
    import pyarrow.parquet as pq

    if cfg.path is None:
        raise ValueError("synthetic source: no path; a stage reading it resolves it to the "
                         "run's synthesize output (see resolve_source_paths)")
    path = existing_file("synthetic", cfg.path)
    table = pq.read_table(path, columns=["id", "prompt", "response"]).to_pylist()
    written = [Sample(**r) for r in table]
    if len({s.id for s in written}) != len(written):
        raise ValueError(f"synthetic source: {path} repeats sample ids")
    rows = ((i, s.prompt, s.response) for i, s in enumerate(written))
    return [written[int(s.id.rpartition("#")[2])]
            for s in finish_rows("synthetic", str(path), "", rows, cfg, need_response=True)]


def _check_local_data_files(data_files: str | list[str] | None) -> None:
    """Say plainly when a local data file is missing, before ``datasets`` says it obscurely."""
    files = [data_files] if isinstance(data_files, str) else list(data_files or [])
    for f in files:
        if "://" in f or any(ch in f for ch in "*?["):
            continue
        if not Path(f).expanduser().is_file():
            raise ValueError(f"hf source: data file {f} does not exist.")


@register_source("hf", HfSourceConfig)
def _load_hf(cfg: HfSourceConfig) -> list[Sample]:
    """A Hugging Face dataset (hub or packaged builder) mapped to prompt/response.

    With a single local data file the ids are ``"<file name>#<row>"``, the same as the
    ``alpaca``/``jsonl`` sources give for that file; otherwise ``"<name>/<split>#<row>"``.
    """
    import datasets  # heavy; only this source needs it

    _check_local_data_files(cfg.data_files)
    dataset = datasets.load_dataset(
        cfg.name,
        cfg.config_name,
        data_files=cfg.data_files,
        split=cfg.split,
        revision=cfg.revision,
        cache_dir=None if cfg.cache_dir is None else str(cfg.cache_dir),
    )
    files = [cfg.data_files] if isinstance(cfg.data_files, str) else cfg.data_files or []
    if len(files) == 1:
        where = str(Path(files[0]).expanduser())
        label = Path(files[0]).name
    else:
        where = label = f"{cfg.name}/{cfg.split}"
    records = enumerate(dataset)
    if cfg.format == "alpaca":
        rows = alpaca_rows("hf", where, records)
    else:
        rows = field_rows("hf", where, records, cfg.prompt_field, cfg.response_field)
    return finish_rows("hf", where, label, rows, cfg, need_response=True)


__all__ = (
    "ALPACA_PROMPT_NO_INPUT",
    "ALPACA_PROMPT_WITH_INPUT",
    "DEFAULT_CHUNK_CHARS",
    "DEFAULT_SEED",
    "SOURCES",
    "AlpacaSourceConfig",
    "HfSourceConfig",
    "JsonlSourceConfig",
    "Sample",
    "SourceConfig",
    "SourceConfigBase",
    "SourceEntry",
    "SyntheticSourceConfig",
    "TextSourceConfig",
    "alpaca_prompt",
    "chunk_text",
    "get_source",
    "load_samples",
    "parse_source_config",
    "register_source",
    "seeded_subset",
    "source_names",
    "split_paragraphs",
)
