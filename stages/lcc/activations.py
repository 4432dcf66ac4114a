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
name, so a killed writer leaves nothing that looks complete. The marker records each layer
file's size and sha256 under ``files`` (path relative to the stage folder), so a shard
damaged after it was finished (a bad disk, a truncating copy) is caught before it is
reused: :func:`shard_problem`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recoup.orchestrator.store import TMP_MARK, atomic_write_json, sha256_file

#: dense(q), dense(q + r+), dense(q + r-), degraded(q)
VIEWS = ("dense_q", "dense_pos", "dense_neg", "degraded_q")
ACTS_DIR = "acts"
SHARDS_DIR = "shards"
#: marker key: relative path of each layer file -> {"size": bytes, "sha256": hex digest}
FILES_KEY = "files"
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
    return root / SHARDS_DIR / f"shard-{shard:04d}.json"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    pq.write_table(table, tmp, **_WRITE_OPTIONS)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_shard_done(root: Path, shard: int, info: Mapping[str, object]) -> None:
    atomic_write_json(marker_file(root, shard), dict(info))


def file_records(root: Path, shard: int, layers: int) -> dict[str, dict[str, object]]:
    """Size and sha256 of each layer file of ``shard``, keyed by path relative to ``root``:
    what the marker stores so that reuse can tell an intact shard from a damaged one."""
    out: dict[str, dict[str, object]] = {}
    for layer in range(layers):
        path = shard_file(root, layer, shard)
        out[path.relative_to(root).as_posix()] = {"size": path.stat().st_size,
                                                  "sha256": sha256_file(path)}
    return out


def shard_problem(root: Path, shard: int, marker: Mapping[str, object], layers: int,
                  ) -> str | None:
    """Why the files of a marked shard cannot be trusted (naming the file), or None.

    Each of its ``layers`` layer files must exist with the size and sha256 its marker
    recorded. A marker without records (written before they existed) cannot vouch for its
    files, so the shard counts as unverifiable rather than silently trusted.
    """
    records = marker.get(FILES_KEY)
    if not isinstance(records, Mapping):
        return f"{marker_file(root, shard)} records no checksums of its files"
    for layer in range(layers):
        path = shard_file(root, layer, shard)
        expected = records.get(path.relative_to(root).as_posix())
        if not isinstance(expected, Mapping):
            return f"{marker_file(root, shard)} records no checksum of {path}"
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{path} has {size} bytes, its shard marker says {expected.get('size')}"
        if sha256_file(path) != expected.get("sha256"):
            return f"{path} does not match its sha256 in the shard marker (corrupted)"
    return None


def done_shards(root: Path) -> set[int]:
    """Shards whose marker exists (their layer files are all complete)."""
    d = root / SHARDS_DIR
    if not d.is_dir():
        return set()
    out = set()
    for p in d.glob("shard-*.json"):
        if TMP_MARK in p.name:
            continue
        try:
            json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        out.add(int(p.stem.split("-")[1]))
    return out


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
