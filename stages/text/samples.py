"""Samples and the configs of their sources: what the ``data`` stage reads, and the rules
every source shares (ids, skipped records, the seeded subset, text chunking).

The sources themselves, registered by name, are in :mod:`recoup.stages.text.datasources`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from recoup.orchestrator.config import StrictModel

logger = logging.getLogger("recoup.stages.text.datasources")

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


def finish_rows(
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


def existing_file(what: str, path: Path) -> Path:
    """Say plainly when ``path`` is missing or not a file, before a deeper error does."""
    path = path.expanduser()
    if not path.exists():
        raise ValueError(f"{what} source: file {path} does not exist.")
    if not path.is_file():
        raise ValueError(f"{what} source: {path} is not a file.")
    return path


def read_jsonl(what: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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


def text_field(what: str, where: str, index: int, record: Mapping[str, Any], key: str) -> str:
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


def alpaca_rows(
    what: str, where: str, records: Iterable[tuple[int, Mapping[str, Any]]]
) -> Iterator[tuple[int, str, str]]:
    """Alpaca records to (index, prompt, response); a missing ``input`` means no input."""
    for index, record in records:
        instruction = text_field(what, where, index, record, "instruction")
        input_text = text_field(what, where, index, record, "input") if "input" in record else ""
        output = text_field(what, where, index, record, "output")
        yield index, alpaca_prompt(instruction, input_text), output


def field_rows(
    what: str,
    where: str,
    records: Iterable[tuple[int, Mapping[str, Any]]],
    prompt_field: str,
    response_field: str,
) -> Iterator[tuple[int, str, str]]:
    """Records to (index, prompt, response) by field name."""
    for index, record in records:
        prompt = text_field(what, where, index, record, prompt_field)
        response = text_field(what, where, index, record, response_field)
        yield index, prompt, response


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
