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

Adding a source is one decorated function::

    @register_source("mine", MineSourceConfig)
    def _load_mine(cfg: MineSourceConfig) -> list[Sample]: ...
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field

from recoup.orchestrator.config import StrictModel

logger = logging.getLogger(__name__)

DEFAULT_SEED = 42
"""Seed of the sample subset; 42 is what the RestoreLCC reference uses."""

DEFAULT_CHUNK_CHARS = 2048
"""Target length of a plain-text chunk: about 500 Llama tokens, one short training sequence."""

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
"""Stanford Alpaca's ``prompt_input`` template, verbatim."""

ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
"""Stanford Alpaca's ``prompt_no_input`` template, verbatim."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One training text, prompt and response kept apart so a loss can mask the prompt.

    The training text is ``prompt + response`` with no separator, as in Stanford Alpaca
    (the Alpaca prompt ends in ``"### Response:"``). Plain LM text has ``response == ""``.
    """

    id: str
    prompt: str
    response: str


# --------------------------------------------------------------------------- configs


class SourceConfigBase(StrictModel):
    """Fields every source shares: how many samples, and the seed that picks them.

    Configs are frozen and refuse unknown keys (:class:`StrictModel`).
    """

    num_samples: int | None = Field(
        default=None,
        gt=0,
        description="How many samples to keep (a seeded subset); None keeps every usable one.",
    )
    seed: int = Field(
        default=DEFAULT_SEED, description="Seed of the subset; the same seed gives the same ids."
    )


class AlpacaSourceConfig(SourceConfigBase):
    """A local jsonl file in Alpaca format (``instruction``, ``input``, ``output``)."""

    source: Literal["alpaca"] = Field(default="alpaca", description="Source name.")
    path: Path = Field(description="The jsonl file, one Alpaca record per line.")


class JsonlSourceConfig(SourceConfigBase):
    """Any local jsonl file whose records hold a prompt and a response under given names."""

    source: Literal["jsonl"] = Field(default="jsonl", description="Source name.")
    path: Path = Field(description="The jsonl file, one JSON object per line.")
    prompt_field: str = Field(default="prompt", description="Record key of the prompt text.")
    response_field: str = Field(default="response", description="Record key of the response text.")


class TextSourceConfig(SourceConfigBase):
    """A plain text file (``.txt`` or WikiText's ``wiki.*.raw``) cut into LM chunks."""

    source: Literal["text"] = Field(default="text", description="Source name.")
    path: Path = Field(description="The text file, UTF-8; paragraphs separated by blank lines.")
    chunk_chars: int = Field(
        default=DEFAULT_CHUNK_CHARS,
        gt=0,
        description="Whole paragraphs are packed into chunks of at most this many characters; "
        "a longer paragraph is cut at whitespace.",
    )


class HfSourceConfig(SourceConfigBase):
    """A dataset read with ``datasets.load_dataset``: a hub id, or a builder such as ``json``."""

    source: Literal["hf"] = Field(default="hf", description="Source name.")
    name: str = Field(
        description="First argument of load_dataset: a hub dataset id (e.g. 'tatsu-lab/alpaca') "
        "or a packaged builder ('json', 'csv', 'parquet', 'text')."
    )
    config_name: str | None = Field(
        default=None, description="The dataset's configuration (load_dataset's `name`)."
    )
    data_files: str | list[str] | None = Field(
        default=None, description="Files for a packaged builder; local paths must exist."
    )
    split: str = Field(default="train", description="The split to read.")
    revision: str | None = Field(default=None, description="Hub revision (commit or tag).")
    format: Literal["fields", "alpaca"] = Field(
        default="fields",
        description="'fields': prompt and response are the columns named below; 'alpaca': the "
        "prompt is the Alpaca template over instruction/input and the response is 'output'.",
    )
    prompt_field: str = Field(default="prompt", description="Column of the prompt ('fields').")
    response_field: str = Field(
        default="response", description="Column of the response ('fields')."
    )
    cache_dir: Path | None = Field(
        default=None, description="Cache of the datasets library; None uses its default."
    )


class SyntheticSourceConfig(SourceConfigBase):
    """Text the dense model wrote itself (the ``synthesize`` stage), for data-free recovery."""

    source: Literal["synthetic"] = Field(default="synthetic", description="Source name.")
    path: Path | None = Field(
        default=None,
        description="A synthetic.parquet file (id, prompt, response); unset: this run's "
        "synthesize stage output (synthesize must then come earlier in run.pipeline).",
    )


SourceConfig = Annotated[
    AlpacaSourceConfig | JsonlSourceConfig | TextSourceConfig | HfSourceConfig
    | SyntheticSourceConfig,
    Field(discriminator="source"),
]
"""The built-in source configs as one tagged union, for composing into a run config."""

# --------------------------------------------------------------------------- registry

ConfigT = TypeVar("ConfigT", bound=SourceConfigBase)
Loader = Callable[[ConfigT], list[Sample]]


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """A registered source: its config class and the function that loads it."""

    name: str
    config_cls: type[SourceConfigBase]
    loader: Callable[[Any], list[Sample]]


_SOURCES: dict[str, SourceEntry] = {}


def register_source(
    name: str, config_cls: type[ConfigT]
) -> Callable[[Loader[ConfigT]], Loader[ConfigT]]:
    """Register a loader under ``name``; a second registration of a name is a bug, so refuse it.

    The config class must tag itself with ``source: Literal[name]`` so that a config read from
    YAML finds its loader.
    """

    def decorate(loader: Loader[ConfigT]) -> Loader[ConfigT]:
        if name in _SOURCES:
            raise ValueError(f"data source {name!r} is already registered")
        tag = config_cls.model_fields.get("source")
        if tag is None or tag.default != name:
            raise ValueError(
                f"{config_cls.__name__} must declare source: Literal[{name!r}] = {name!r}"
            )
        _SOURCES[name] = SourceEntry(name=name, config_cls=config_cls, loader=loader)
        return loader

    return decorate


def source_names() -> list[str]:
    """The registered source names, sorted."""
    return sorted(_SOURCES)


def get_source(name: str) -> SourceEntry:
    """Look a source up by name; an unknown name is an error that lists the known ones."""
    try:
        return _SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown data source {name!r}; known sources: {', '.join(source_names())}"
        ) from None


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


# --------------------------------------------------------------------------- shared rules


def alpaca_prompt(instruction: str, input_text: str) -> str:
    """The Stanford Alpaca prompt: the with-input template only when the input is not blank."""
    if input_text.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def seeded_subset(n: int, num_samples: int | None, seed: int) -> list[int]:
    """Indices of the kept items: all of them, or a seeded prefix of a shuffle, in order.

    ``random.Random(int).shuffle`` is stable across Python versions, so ids do not drift.
    """
    if num_samples is None or num_samples >= n:
        return list(range(n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:num_samples])


def _finish(
    what: str,
    where: str,
    label: str,
    rows: Iterable[tuple[int, str, str]],
    cfg: SourceConfigBase,
    *,
    need_response: bool,
) -> list[Sample]:
    """Apply the shared rules to (record index, prompt, response) rows and make the samples.

    ``what`` names the source and ``where`` the file or dataset in error messages; ``label``
    prefixes the ids.
    """
    total = 0
    usable: list[Sample] = []
    for index, prompt, response in rows:
        total += 1
        if need_response and not response.strip():
            continue
        usable.append(Sample(id=f"{label}#{index}", prompt=prompt, response=response))
    skipped = total - len(usable)
    if total == 0:
        raise ValueError(f"{what} source: {where} holds no records.")
    if skipped:
        logger.warning(
            "%s source: skipped %d of %d records of %s for an empty response.",
            what,
            skipped,
            total,
            where,
        )
    if not usable:
        raise ValueError(
            f"{what} source: none of the {total} records of {where} has a non-empty response."
        )
    if cfg.num_samples is not None and cfg.num_samples > len(usable):
        raise ValueError(
            f"{what} source: {where} has {len(usable)} usable samples ({total} records, "
            f"{skipped} skipped for an empty response), fewer than the {cfg.num_samples} asked for."
        )
    return [usable[i] for i in seeded_subset(len(usable), cfg.num_samples, cfg.seed)]


def _existing_file(what: str, path: Path) -> Path:
    """Say plainly when ``path`` is missing or not a file, before a deeper error does."""
    path = path.expanduser()
    if not path.exists():
        raise ValueError(f"{what} source: file {path} does not exist.")
    if not path.is_file():
        raise ValueError(f"{what} source: {path} is not a file.")
    return path


def _read_jsonl(what: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (record index, object) per non-blank line; a bad line names its line number."""
    index = 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{what} source: {path} line {line_no} is not JSON ({e.msg})."
                ) from e
            if not isinstance(record, dict):
                raise ValueError(f"{what} source: {path} line {line_no} is not a JSON object.")
            yield index, record
            index += 1


def _text_field(what: str, where: str, index: int, record: Mapping[str, Any], key: str) -> str:
    """A record's string field, or an error naming the record and the keys it does have."""
    if key not in record:
        raise ValueError(
            f"{what} source: record {index} of {where} has no field {key!r} "
            f"(it has {', '.join(sorted(map(str, record)))})."
        )
    value = record[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"{what} source: field {key!r} of record {index} of {where} is a "
            f"{type(value).__name__}, not text."
        )
    return value


def _alpaca_rows(
    what: str, where: str, records: Iterable[tuple[int, Mapping[str, Any]]]
) -> Iterator[tuple[int, str, str]]:
    """Alpaca records to (index, prompt, response); a missing ``input`` means no input."""
    for index, record in records:
        instruction = _text_field(what, where, index, record, "instruction")
        input_text = _text_field(what, where, index, record, "input") if "input" in record else ""
        output = _text_field(what, where, index, record, "output")
        yield index, alpaca_prompt(instruction, input_text), output


def _field_rows(
    what: str,
    where: str,
    records: Iterable[tuple[int, Mapping[str, Any]]],
    prompt_field: str,
    response_field: str,
) -> Iterator[tuple[int, str, str]]:
    """Records to (index, prompt, response) by field name."""
    for index, record in records:
        prompt = _text_field(what, where, index, record, prompt_field)
        response = _text_field(what, where, index, record, response_field)
        yield index, prompt, response


# --------------------------------------------------------------------------- sources


@register_source("alpaca", AlpacaSourceConfig)
def _load_alpaca(cfg: AlpacaSourceConfig) -> list[Sample]:
    """Alpaca jsonl: the Stanford template as the prompt, ``output`` as the response."""
    path = _existing_file("alpaca", cfg.path)
    rows = _alpaca_rows("alpaca", str(path), _read_jsonl("alpaca", path))
    return _finish("alpaca", str(path), path.name, rows, cfg, need_response=True)


@register_source("jsonl", JsonlSourceConfig)
def _load_jsonl(cfg: JsonlSourceConfig) -> list[Sample]:
    """Any jsonl: prompt and response taken verbatim from the configured fields."""
    path = _existing_file("jsonl", cfg.path)
    records = _read_jsonl("jsonl", path)
    rows = _field_rows("jsonl", str(path), records, cfg.prompt_field, cfg.response_field)
    return _finish("jsonl", str(path), path.name, rows, cfg, need_response=True)


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs are runs of lines between whitespace-only lines, each stripped.

    In WikiText's raw files every paragraph and heading is one line and the separators are
    ``" \\n"`` lines, so this yields the articles' paragraphs and headings in order.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current).strip())
            current = []
    if current:
        paragraphs.append("\n".join(current).strip())
    return paragraphs


def _cut(paragraph: str, chunk_chars: int) -> list[str]:
    """Cut an over-long paragraph at whitespace into pieces of at most ``chunk_chars``."""
    pieces: list[str] = []
    rest = paragraph
    while len(rest) > chunk_chars:
        cut = rest.rfind(" ", 1, chunk_chars + 1)
        if cut <= 0:
            cut = chunk_chars
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Pack whole paragraphs, joined by a blank line, into chunks of at most ``chunk_chars``.

    Whole paragraphs keep each chunk readable text rather than a cut mid-sentence; only a
    paragraph longer than a chunk is cut, at whitespace.
    """
    chunks: list[str] = []
    current = ""
    for paragraph in split_paragraphs(text):
        for piece in _cut(paragraph, chunk_chars):
            if not current:
                current = piece
            elif len(current) + 2 + len(piece) <= chunk_chars:
                current = f"{current}\n\n{piece}"
            else:
                chunks.append(current)
                current = piece
    if current:
        chunks.append(current)
    return chunks


@register_source("text", TextSourceConfig)
def _load_text(cfg: TextSourceConfig) -> list[Sample]:
    """Plain text as prompt-less LM samples: the chunk is the prompt, the response is empty."""
    path = _existing_file("text", cfg.path)
    chunks = chunk_text(path.read_text(encoding="utf-8"), cfg.chunk_chars)
    rows = ((i, chunk, "") for i, chunk in enumerate(chunks))
    return _finish("text", str(path), path.name, rows, cfg, need_response=False)


@register_source("synthetic", SyntheticSourceConfig)
def _load_synthetic(cfg: SyntheticSourceConfig) -> list[Sample]:
    """The synthesize stage's samples file, its ids (``synthetic#N``) kept as written.

    Any Parquet file with string columns id, prompt and response will do (others ignored).
    """
    import pyarrow.parquet as pq

    if cfg.path is None:
        raise ValueError("synthetic source: no path; a stage reading it resolves it to the "
                         "run's synthesize output (see resolve_source_paths)")
    path = _existing_file("synthetic", cfg.path)
    table = pq.read_table(path, columns=["id", "prompt", "response"]).to_pylist()
    written = [Sample(**r) for r in table]
    if len({s.id for s in written}) != len(written):
        raise ValueError(f"synthetic source: {path} repeats sample ids")
    rows = ((i, s.prompt, s.response) for i, s in enumerate(written))
    return [written[int(s.id.rpartition("#")[2])]
            for s in _finish("synthetic", str(path), "", rows, cfg, need_response=True)]


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
        rows = _alpaca_rows("hf", where, records)
    else:
        rows = _field_rows("hf", where, records, cfg.prompt_field, cfg.response_field)
    return _finish("hf", where, label, rows, cfg, need_response=True)
