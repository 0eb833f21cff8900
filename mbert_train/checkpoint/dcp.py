"""The training state as one `torch.distributed.checkpoint` (DCP), written and read at any layout:
every rank writes the pieces it holds, placed in the *full* (unsharded, vocabulary-trimmed)
parameter, and reads the pieces it needs.

A rank holds, per parameter, a flat range of its tensor-parallel shard: the whole shard at
ZeRO-0, its ZeRO partition's fragment at ZeRO-1/2 (`Fragment`). That range is cut into
rectangles of the full parameter (a flat range of a 2-D shard is at most a partial row, full
rows and a partial row; a fused-QKV shard maps to three row blocks; vocabulary padding is
dropped), and each rectangle becomes one chunk of a DCP tensor named `NAME/KIND`: `param` (the
weights), `exp_avg`, `exp_avg_sq`, and `master` where mixed precision keeps fp32 master weights.
The full shape comes from the live parameter: its shard's shape, its TP sharding and the
model's vocabulary size. DCP records the chunks in its metadata; a load at another TP, DP or
ZeRO stage asks for its own rectangles and DCP reads the overlapping pieces, each rank only
what it needs. No rank ever holds more than its own shard.

Who writes what, so that no chunk is written twice: a TP-sharded parameter by every TP rank,
a TP-replicated one by TP rank 0; at ZeRO-0 (state replicated over DP) by DP rank 0 only.

Besides tensors a state holds *blobs*, byte strings stored as they are (DCP's `BYTE_IO`
items): the counters as JSON, each rank's RNG state. Loading never unpickles: `.metadata` goes
through an allow-list (`SafeReader`), tensors through `torch.load(weights_only=True)`, and blobs
are handed back as bytes.
"""

from __future__ import annotations

import errno
import io
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, MetadataIndex,
                                                   StorageMeta, TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, ReadItem, SavePlan, TensorWriteData,
                                                  WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mbert_train.model.weights import VOCAB_PARAMS
from mbert_train.parallel.layers import Sharding

METADATA_FILE = ".metadata"
"""DCP's index of a saved state (which chunk of which tensor is where), written last by rank 0."""
PARAM = "param"
"""The kind of the weights themselves."""


@dataclass
class Fragment:
    """The part of one parameter's optimizer state a rank holds.

    `start`, `numel`: the flat range of the rank's TP shard (`local_shape`); `views`: state
    kind -> 1-D tensor of `numel` elements aliasing the optimizer's own storage."""

    name: str
    local_shape: tuple[int, ...]
    start: int
    numel: int
    views: dict[str, torch.Tensor]
    sharding: Sharding

    def full_shape(self, tp: int, vocab_size: int) -> tuple[int, ...]:
        """The shape of the full parameter: the shard's, times `tp` along the partition dim,
        and `vocab_size` rows for a vocabulary parameter (its padding dropped)."""
        shape = list(self.local_shape)
        if self.sharding.sharded:
            shape[self.sharding.dim] *= tp
        if self.name in VOCAB_PARAMS:
            shape[0] = vocab_size
        return tuple(shape)


@dataclass
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    tensor: torch.Tensor  # aliases the fragment view


def _local_rects(shape: tuple[int, ...], start: int, numel: int) -> Iterator[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """(position in the flat range, offsets, sizes) of the rectangles covering flat range
    [start, start + numel) of a row-major tensor of `shape` (1-D or 2-D)."""
    end = start + numel
    if len(shape) == 1:
        if numel:
            yield 0, (start,), (numel,)
        return
    if len(shape) != 2:
        raise ValueError(f"only 1-D and 2-D parameters are supported, got shape {shape}")
    cols = shape[1]
    r0, c0 = divmod(start, cols)
    r1, c1 = divmod(end, cols)
    if r0 == r1:
        if c1 > c0:
            yield 0, (r0, c0), (1, c1 - c0)
        return
    pos = 0
    if c0:
        yield pos, (r0, c0), (1, cols - c0)
        pos += cols - c0
        r0 += 1
    if r1 > r0:
        yield pos, (r0, 0), (r1 - r0, cols)
        pos += (r1 - r0) * cols
    if c1:
        yield pos, (r1, 0), (1, c1)


def _to_global(frag: Fragment, offsets: tuple[int, ...], sizes: tuple[int, ...], tp: int, tp_rank: int,
               full_len: int | None) -> Iterator[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Split a local rectangle at the shard's stride blocks and place each piece in the full
    parameter: (first local index along the partition dim, global offsets, sizes). Pieces at
    or past `full_len` (vocabulary padding) are dropped."""
    if not frag.sharding.sharded:
        yield offsets[0] if offsets else 0, offsets, sizes
        return
    dim, stride = frag.sharding.dim, frag.sharding.stride
    local_len = frag.local_shape[dim]
    block = local_len // stride
    lo, hi = offsets[dim], offsets[dim] + sizes[dim]
    while lo < hi:
        k, inner = divmod(lo, block)
        stop = min(hi, (k + 1) * block)
        g = k * block * tp + tp_rank * block + inner
        n = stop - lo
        if full_len is not None:
            n = min(n, full_len - g)
        if n > 0:
            out_offsets = list(offsets)
            out_sizes = list(sizes)
            out_offsets[dim], out_sizes[dim] = g, n
            yield lo, tuple(out_offsets), tuple(out_sizes)
        lo = stop


def chunks(frag: Fragment, kind: str, tp: int, tp_rank: int, full_shape: tuple[int, ...]
           ) -> tuple[list[Chunk], list[torch.Tensor]]:
    """(the chunks of the full parameter this fragment holds, views of its vocabulary padding).
    Every chunk's tensor aliases `frag.views[kind]`."""
    view = frag.views[kind]
    full_len = full_shape[0] if frag.name in VOCAB_PARAMS else None
    found = []
    for pos, offsets, sizes in _local_rects(frag.local_shape, frag.start, frag.numel):
        cols = sizes[1] if len(sizes) == 2 else 1
        rect = view.narrow(0, pos, sizes[0] * cols).view(sizes)
        for local_lo, g_offsets, g_sizes in _to_global(frag, offsets, sizes, tp, tp_rank, full_len):
            dim = frag.sharding.dim if frag.sharding.sharded else 0
            piece = rect.narrow(dim, local_lo - offsets[dim], g_sizes[dim])
            found.append(Chunk(g_offsets, g_sizes, piece))
    padding = []
    if full_len is not None:
        # Vocabulary padding rows (TP-dependent) are not in the full form: they are zeroed on
        # load. Vocabulary parameters are split by rows with stride 1, so they are a flat tail.
        cols = frag.local_shape[1] if len(frag.local_shape) == 2 else 1
        first_pad = max(0, full_len - tp_rank * frag.local_shape[0]) * cols
        if first_pad < frag.start + frag.numel:
            padding.append(view.narrow(0, max(0, first_pad - frag.start), frag.start + frag.numel - max(first_pad, frag.start)))
    return found, padding


def key(name: str, kind: str) -> str:
    """The DCP name of one kind of state of parameter `name`: `layers.0.attn.qkv.weight/exp_avg`."""
    return f"{name}/{kind}"


class _ChunkTable:
    """fqn -> (full shape, dtype, [Chunk]) for the tensors this rank writes or reads, and the
    blobs it writes (fqn -> bytes) or reads (fqn -> bytes once read)."""

    def __init__(self) -> None:
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype, list[Chunk]]] = {}
        self.padding: list[torch.Tensor] = []
        self.blobs: dict[str, bytes | None] = {}

    def add(self, fqn: str, full_shape: tuple[int, ...], dtype: torch.dtype, found: list[Chunk]) -> None:
        entry = self.tensors.setdefault(fqn, (full_shape, dtype, []))
        entry[2].extend(found)


class _SavePlanner(DefaultSavePlanner):
    def __init__(self, table: _ChunkTable) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.table = table

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, (full_shape, dtype, found) in self.table.tensors.items():
            for chunk in found:
                items.append(WriteItem(
                    index=MetadataIndex(fqn, torch.Size(chunk.offsets)), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes)),
                        properties=TensorProperties(dtype=dtype), size=torch.Size(full_shape))))
        items += [WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO) for fqn in self.table.blobs]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.table.blobs[write_item.index.fqn])
        _, _, found = self.table.tensors[write_item.index.fqn]
        for chunk in found:
            if tuple(chunk.offsets) == tuple(write_item.index.offset):
                return chunk.tensor.detach().cpu()
        raise KeyError(f"no chunk of {write_item.index.fqn} at {write_item.index.offset}")


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self, table: _ChunkTable) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.table = table

    def create_local_plan(self) -> LoadPlan:
        requests = []
        for fqn, (full_shape, _, found) in self.table.tensors.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if not isinstance(md, TensorStorageMetadata):
                raise MissingState(f"{fqn} is missing")
            if tuple(md.size) != tuple(full_shape):
                raise MissingState(f"{fqn} has shape {tuple(md.size)}, this model needs {tuple(full_shape)}")
            local = [ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in found]
            requests += create_read_items_for_chunk_list(fqn, md, local)
        for fqn in self.table.blobs:
            if not isinstance(self.metadata.state_dict_metadata.get(fqn), BytesStorageMetadata):
                raise MissingState(f"{fqn} is missing")
            requests.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(fqn),
                                     dest_offsets=torch.Size((0,)), storage_index=MetadataIndex(fqn),
                                     storage_offsets=torch.Size((0,)), lengths=torch.Size((0,))))
        self.plan = LoadPlan(requests)
        return self.plan

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.table.tensors[index.fqn][2][index.index].tensor

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.table.blobs[read_item.dest_index.fqn] = value.read()


class MissingState(KeyError):
    pass


class UnsafeCheckpoint(ValueError):
    """DCP's `.metadata` names a Python global outside its own metadata classes."""


_SAFE_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its `.metadata` and reads it back with a plain `pickle.load`, which would run
    whatever a received checkpoint names. Only DCP's own metadata classes (and torch dtypes)
    are allowed here; anything else is refused before it is called."""

    def find_class(self, module: str, name: str):
        if name in _SAFE_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"{module}.{name}")


class SafeReader(dcp.FileSystemReader):
    """`FileSystemReader` whose metadata is unpickled through an allow-list (the tensor files
    themselves DCP already reads with `torch.load(weights_only=True)`)."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / METADATA_FILE
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@dataclass
class Part:
    """Fragments and the kinds of state to write or read of each."""

    fragments: list[Fragment]
    kinds: tuple[str, ...]


def _table(parts: list[Part], *, tp: int, tp_rank: int, vocab_size: int, writer: bool) -> _ChunkTable:
    table = _ChunkTable()
    for part in parts:
        for frag in part.fragments:
            if writer and not frag.sharding.sharded and tp_rank != 0:
                continue  # replicated over TP: TP rank 0 writes it
            full_shape = frag.full_shape(tp, vocab_size)
            for kind in part.kinds:
                found, padding = chunks(frag, kind, tp, tp_rank, full_shape)
                table.add(key(frag.name, kind), full_shape, frag.views[kind].dtype, found)
                table.padding += padding
    return table


class _RecordingWriter(dcp.FileSystemWriter):
    """`FileSystemWriter` that remembers the files this rank wrote that a load reads: its data
    files and, on the coordinator, `.metadata`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.written: list[str] = []

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        self.written += sorted({result.storage_data.relative_path for result in future.value()})
        return future

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)
        self.written.append(METADATA_FILE)


def save_state(directory: Path, parts: list[Part], blobs: dict[str, bytes], *, tp: int, tp_rank: int,
               vocab_size: int, group=None) -> list[str]:
    """Collective over `group` (default: the world): write the state of `parts` and `blobs` into
    the DCP directory `directory` (replicas pass no fragments). Returns the names (in
    `directory`) of the files this rank wrote that a load reads."""
    table = _table(parts, tp=tp, tp_rank=tp_rank, vocab_size=vocab_size, writer=True)
    table.blobs.update(blobs)
    return _save(directory, table, group=group)


def _save(directory: Path, table: _ChunkTable, *, group=None, no_dist: bool = False) -> list[str]:
    writer = _RecordingWriter(str(directory), sync_files=True, single_file_per_rank=True)
    with _one_process(no_dist):
        dcp.save({}, storage_writer=writer, planner=_SavePlanner(table), process_group=group, no_dist=no_dist)
    return writer.written


@contextmanager
def _one_process(no_dist: bool) -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process; here that
    is the intent (`mbert-convert`), and the warning would be the tool's only output."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")
        yield


def load_state(directory: Path, parts: list[Part], blobs: list[str], *, tp: int, tp_rank: int, vocab_size: int,
               group=None) -> dict[str, bytes]:
    """Collective: fill every fragment's views of its part's kinds from `directory`, whatever
    layout wrote it, and return the `blobs` named."""
    _require_metadata(directory)
    table = _table(parts, tp=tp, tp_rank=tp_rank, vocab_size=vocab_size, writer=False)
    table.blobs = dict.fromkeys(blobs)
    for view in table.padding:
        view.zero_()
    dcp.load({}, storage_reader=SafeReader(str(directory)), planner=_LoadPlanner(table), process_group=group)
    return table.blobs


def save_full(directory: Path, tensors: dict[str, torch.Tensor], blobs: dict[str, bytes]) -> list[str]:
    """Write whole tensors (each one chunk) and blobs as a DCP directory, in this one process
    (no process group): how `mbert-convert upgrade-checkpoint` writes. Returns the files."""
    table = _ChunkTable()
    for fqn, tensor in tensors.items():
        tensor = tensor.contiguous()
        table.add(fqn, tuple(tensor.shape), tensor.dtype, [Chunk((0,) * tensor.dim(), tuple(tensor.shape), tensor)])
    table.blobs.update(blobs)
    return _save(directory, table, no_dist=True)


def read_full(directory: Path, kind: str | None = None) -> dict[str, torch.Tensor]:
    """The full tensors of a saved state (of one `kind`, keyed by parameter name; else every
    tensor, keyed `NAME/KIND`), in this one process (no process group): for `mbert-convert`."""
    metadata = SafeReader(str(directory)).read_metadata()
    state = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and (kind is None or fqn.endswith(f"/{kind}")):
            state[fqn] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    with _one_process(True):
        dcp.load(state, storage_reader=SafeReader(str(directory)), no_dist=True)
    return state if kind is None else {fqn.rsplit("/", 1)[0]: t for fqn, t in state.items()}


def _require_metadata(directory: Path) -> None:
    if not (Path(directory) / METADATA_FILE).is_file():  # DCP would report it as an AssertionError
        raise FileNotFoundError(errno.ENOENT, "missing", str(Path(directory) / METADATA_FILE))


def saved_keys(directory: Path) -> set[str]:
    """The names in a saved state (reads only its metadata)."""
    _require_metadata(directory)
    return set(SafeReader(str(directory)).read_metadata().state_dict_metadata)
