"""The on-disk format of collected activations, shared by collect (writer) and svd/select
(readers).

Layout inside the collect stage folder::

    acts/layer=07/shard-0003.parquet    one file per (layer, shard)
    shards/shard-0003.json              marker: shard 3 is complete (all its layers)

Each Parquet file has the columns ``sample_id`` (string), ``view`` (string, one of
:data:`VIEWS`) and ``act`` (fixed-size list of float16/float32 of length
``n_heads * d_head``: the input of ``self_attn.o_proj`` at the chosen token, heads
concatenated). Partitioning by layer lets a per-layer job read one layer and nothing else.
A shard's files count only once its marker exists; files are written through a temporary
name, so a killed writer leaves nothing that looks complete. Markers, their checksums and
reuse are those of every sharded stage: :mod:`recoup.orchestrator.shards`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recoup.orchestrator import shards
from recoup.orchestrator.store import atomic_path

#: dense(q), dense(q + r+), dense(q + r-), degraded(q)
VIEWS = ("dense_q", "dense_pos", "dense_neg", "degraded_q")
ACTS_DIR = "acts"
SHARDS_DIR = shards.SHARDS_DIR
#: marker key: relative path of each layer file -> {"size": bytes, "sha256": hex digest}
FILES_KEY = shards.FILES_KEY
_PA_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
_NP_DTYPES = {"float16": np.float16, "float32": np.float32}
#: Activations are all distinct floats: a dictionary page (Parquet's default) makes the file
#: 1.5x the raw bytes and the write 100x slower. Byte-stream-split + zstd stores them in
#: about 0.91x (float32) / 0.95x (float16) of the raw bytes, at memcpy-like speed.
_WRITE_OPTIONS: dict[str, object] = {
    "use_dictionary": ["sample_id", "view"],
    "compression": "zstd",
    "column_encoding": {"act.list.element": "BYTE_STREAM_SPLIT"},
}


def layer_dir(root: Path, layer: int) -> Path:
    return root / ACTS_DIR / f"layer={layer:02d}"


def shard_file(root: Path, layer: int, shard: int) -> Path:
    return layer_dir(root, layer) / f"shard-{shard:04d}.parquet"


def marker_file(root: Path, shard: int) -> Path:
    return shards.marker_file(root, shard)


def layer_files(root: Path, shard: int, layers: int) -> list[Path]:
    """The data files of one shard: one per layer."""
    return [shard_file(root, layer, shard) for layer in range(layers)]


def schema(width: int, dtype: str) -> pa.Schema:
    return pa.schema([
        pa.field("sample_id", pa.string()),
        pa.field("view", pa.string()),
        pa.field("act", pa.list_(_PA_DTYPES[dtype], width)),
    ])


def write_layer_shard(path: Path, sample_ids: list[str], views: list[str], acts: torch.Tensor,
                      dtype: str) -> None:
    """Write one (layer, shard) file atomically. acts: (rows, n_heads * d_head)."""
    rows, width = acts.shape
    flat = acts.detach().to(torch.float32).cpu().numpy().astype(_NP_DTYPES[dtype]).reshape(-1)
    table = pa.Table.from_arrays(
        [pa.array(sample_ids, pa.string()), pa.array(views, pa.string()),
         pa.FixedSizeListArray.from_arrays(pa.array(flat, _PA_DTYPES[dtype]), width)],
        schema=schema(width, dtype),
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **_WRITE_OPTIONS)


def mark_shard_done(root: Path, shard: int, info: Mapping[str, object]) -> None:
    """Mark a shard complete with ``info`` as its marker (readers only need it to exist;
    collect's own markers also carry the key and checksums that reuse checks)."""
    shards.write_marker(root, shard, info)


def file_records(root: Path, shard: int, layers: int) -> dict[str, dict[str, object]]:
    """Size and sha256 of each layer file of ``shard``, keyed by path relative to ``root``:
    what the marker stores so that reuse can tell an intact shard from a damaged one."""
    return shards.file_records(root, layer_files(root, shard, layers))


def shard_problem(root: Path, shard: int, marker: Mapping[str, object], layers: int,
                  ) -> str | None:
    """Why the layer files of a marked shard cannot be trusted (naming the file), or None."""
    return shards.files_problem(root, shard, marker, layer_files(root, shard, layers))


def done_shards(root: Path) -> set[int]:
    """Shards whose marker exists (their layer files are all complete)."""
    return shards.done_shards(root)


def read_layer(root: Path, layer: int, shards: Iterable[int] | None = None,
               ) -> dict[str, tuple[list[str], torch.Tensor]]:
    """One layer's activations: view -> (sample ids sorted, float32 (N, n_heads * d_head)).

    Only shards with a marker are read (or exactly ``shards``); rows of every view are
    sorted by sample id, so row i of each view belongs to the same sample.
    """
    wanted = sorted(done_shards(root) if shards is None else shards)
    if not wanted:
        raise FileNotFoundError(f"no complete activation shards in {root / ACTS_DIR}")
    tables = []
    for s in wanted:
        path = shard_file(root, layer, s)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing although shard {s} is marked complete")
        tables.append(pq.read_table(path))
    table = pa.concat_tables(tables)
    ids = table.column("sample_id").to_pylist()
    views = table.column("view").to_pylist()
    act_col = table.column("act").combine_chunks()
    width = act_col.type.list_size
    values = act_col.flatten().to_numpy(zero_copy_only=False)
    acts = torch.from_numpy(values.astype(np.float32)).view(len(ids), width)  # (rows, H*d)
    out: dict[str, tuple[list[str], torch.Tensor]] = {}
    for view in sorted(set(views)):
        rows = sorted((sid, i) for i, (sid, v) in enumerate(zip(ids, views, strict=True))
                      if v == view)
        index = torch.tensor([i for _, i in rows], dtype=torch.long)
        out[view] = ([sid for sid, _ in rows], acts[index])
    return out
