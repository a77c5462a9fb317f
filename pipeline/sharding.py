"""Tensors held in flat pieces across ranks: where each piece lies, whole tensors from the pieces,
and the checkpoint files that hold the pieces, readable at any process count.

Every sharding strategy gives each rank a *contiguous range of a tensor seen flat* (row-major):

- DeepSpeed ZeRO-1/2: a parameter's fragment of the rank's fp32 partition (its
  ``lp_fragment_address``: start and length within the parameter);
- DeepSpeed ZeRO-3: partition ``r`` of a parameter holds elements ``[r·p, r·p + p)`` (``p`` the
  partition size; the tail of the last partitions is padding, not data);
- FSDP2 (``Shard(0)``): rows ``[r·c, r·c + c)`` of the parameter (``c = ceil(rows / ranks)``),
  which for a contiguous tensor are the flat elements ``[r·c·row, ...)``.

So one description covers them all: a `Layout` maps each tensor name to its shape, dtype and the
`Piece` (rank, offset, length) each rank holds, the same on every rank (gathered once when the
strategy wraps the model). `assemble` builds whole tensors from the ranks' pieces (an all-gather
per tensor, padded to the longest piece; exact bits), for sampling, evaluation and the few whole
files a checkpoint keeps.

On disk a sharded *part* of a checkpoint (``model``, ``ema``, ``optimizer``) is::

    PART.safetensors             whole tensors, written by rank 0 (buffers; everything, when the
                                 strategy does not shard the part, e.g. DDP or a legacy checkpoint)
    PART.rank-RRRRR.safetensors  rank R's pieces: one 1-D tensor per name
    shards.json                  the layout of every sharded part (rank 0), plain JSON

`PartReader` returns any range of any tensor from whichever files hold it, so a checkpoint
written by N processes loads onto M: each rank reads only the files that overlap its own ranges.
Every file is checked against the manifest's sha256 as it is read (pipeline/checkpoint.py), and
nothing is unpickled: safetensors and JSON only (docs/checkpoints.md says why not
``torch.distributed.checkpoint``, whose metadata file is a pickle).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pipeline import watchdog
from pipeline.errors import UserError

SHARDS_FILE = "shards.json"
SHARDS_FORMAT = "genpipe-shards/1"


def rank_part_file(part: str, rank: int) -> str:
    return f"{part}.rank-{rank:05d}.safetensors"


def whole_part_file(part: str) -> str:
    return f"{part}.safetensors"


# ---------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Piece:
    rank: int
    offset: int
    length: int


@dataclass(frozen=True)
class TensorLayout:
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def piece_of(self, rank: int) -> Piece | None:
        for piece in self.pieces:
            if piece.rank == rank:
                return piece
        return None


class Layout(dict):
    """name -> `TensorLayout`, in the order the tensors were given (the same on every rank)."""

    @classmethod
    def gather(cls, specs: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]], processes) -> Layout:
        """Every rank's ``{name: (shape, dtype, offset, length)}`` (length 0: no piece) into one
        layout. Collective."""
        mine = {name: (offset, length) for name, (_, _, offset, length) in specs.items()}
        everyone = processes.all_gather_objects(mine)
        layout = cls()
        for name, (shape, dtype, _, _) in specs.items():
            pieces = tuple(Piece(rank, *ranges[name]) for rank, ranges in enumerate(everyone)
                           if ranges.get(name, (0, 0))[1] > 0)
            layout[name] = TensorLayout(tuple(shape), dtype_name(dtype), pieces)
        layout.check()
        return layout

    def check(self) -> None:
        """The pieces of every tensor cover it exactly once (our own invariant: a bug if not)."""
        for name, tensor in self.items():
            covered = 0
            for piece in sorted(tensor.pieces, key=lambda p: p.offset):
                if piece.offset != covered:  # a gap or an overlap
                    covered = -1
                    break
                covered += piece.length
            if covered != tensor.numel:
                raise AssertionError(f"layout of {name}: pieces {tensor.pieces} do not tile {tensor.numel} elements")

    def renamed(self, prefix: str, names: Iterable[str] | None = None) -> Layout:
        """The same pieces under ``prefix + name`` (the optimizer's moments: ``exp_avg/NAME``)."""
        return Layout((prefix + name, self[name]) for name in (self if names is None else names))

    def to_json(self) -> dict:
        return {name: {"shape": list(t.shape), "dtype": t.dtype,
                       "pieces": [[p.rank, p.offset, p.length] for p in t.pieces]} for name, t in self.items()}

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        return cls((name, TensorLayout(tuple(t["shape"]), t["dtype"], tuple(Piece(*p) for p in t["pieces"])))
                   for name, t in data.items())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# ---------------------------------------------------------------------------------------------
# Whole tensors from the pieces


def assemble(layout: Layout, local: dict[str, torch.Tensor], processes, device: torch.device | None = None,
             dst: int | None = None, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors of ``layout`` from every rank's ``local`` pieces (1-D, this rank's), on
    ``device`` (default: the pieces' device). Collective; with ``dst`` only that rank gets them
    (the others get {}). One tensor at a time, so the extra memory is one tensor's worth; with
    ``into`` (name -> tensor of the whole shape) each is copied there instead of returned."""
    import torch.distributed as dist

    rank, world_size = processes.rank, processes.world_size
    whole: dict[str, torch.Tensor] = {}
    for name, tensor in layout.items():
        piece = tensor.piece_of(rank)
        mine = local[name] if piece is not None else None
        dtype = torch_dtype(tensor.dtype)
        where = mine.device if mine is not None else processes.device
        if world_size == 1:
            flat = mine.detach().reshape(-1).clone()
        else:
            watchdog.entering_collective()
            longest = max(p.length for p in tensor.pieces)
            padded = torch.zeros(longest, dtype=dtype, device=processes.device)
            if mine is not None:
                padded[: piece.length].copy_(mine.detach().reshape(-1))
            if dst is None:
                received = [torch.empty_like(padded) for _ in range(world_size)]
                dist.all_gather(received, padded)
            else:
                received = [torch.empty_like(padded) for _ in range(world_size)] if rank == dst else None
                dist.gather(padded, received, dst=dst)
                if rank != dst:
                    continue
            flat = torch.empty(tensor.numel, dtype=dtype, device=processes.device)
            for p in tensor.pieces:
                flat[p.offset: p.offset + p.length].copy_(received[p.rank][: p.length])
            del received
        if into is not None:
            into[name].copy_(flat.view(tensor.shape))
        else:
            whole[name] = flat.view(tensor.shape).to(device or where)
        del flat
    return whole


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def piece_files(part: str, local: dict[str, torch.Tensor], rank: int) -> dict:
    """This rank's file of a sharded part (``{file: ("tensors", {name: 1-D piece})}``)."""
    return {rank_part_file(part, rank): ("tensors", {name: piece.reshape(-1) for name, piece in local.items()})}


def shards_file(layouts: dict[str, Layout], world_size: int) -> dict:
    """Rank 0's index of the sharded parts of a checkpoint."""
    return {SHARDS_FILE: ("json", {"format": SHARDS_FORMAT, "world_size": world_size,
                                   "parts": {part: layout.to_json() for part, layout in layouts.items()}})}


class PartReader:
    """Any flat range of any tensor of one checkpoint part, from its whole file and/or its per-rank
    files (see the module docstring). Files are read (hash-checked) on first use and kept until
    `release`; a rank resharding N -> M reads only the files its ranges overlap."""

    def __init__(self, loaded, part: str):
        self.loaded = loaded
        self.part = part
        self.layout = Layout()
        if loaded.has(SHARDS_FILE):
            index = loaded.json(SHARDS_FILE)
            if index.get("format") != SHARDS_FORMAT:
                raise ValueError(f"{SHARDS_FILE}: unknown format {index.get('format')!r}")
            self.layout = Layout.from_json(index["parts"].get(part, {}))
            try:
                self.layout.check()
            except AssertionError as exc:  # read from disk: damaged or edited, not our invariant
                raise UserError(f"checkpoint {loaded.path / SHARDS_FILE}: {exc} (damaged or edited; "
                                "resume from another checkpoint)") from None
        self._whole: dict[str, torch.Tensor] | None = None
        self._ranks: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def exists(self) -> bool:
        return bool(self.layout) or self.loaded.has(whole_part_file(self.part))

    @property
    def sharded(self) -> bool:
        return bool(self.layout)

    def whole_tensors(self) -> dict[str, torch.Tensor]:
        """The part's whole file (buffers of a sharded part; everything of an unsharded one)."""
        if self._whole is None:
            name = whole_part_file(self.part)
            self._whole = self.loaded.tensors(name) if self.loaded.has(name) else {}
        return self._whole

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {name: tuple(tensor.shape) for name, tensor in self.whole_tensors().items()}
        shapes.update({name: tensor.shape for name, tensor in self.layout.items()})
        return shapes

    def __contains__(self, name: str) -> bool:
        return name in self.layout or name in self.whole_tensors()

    def range(self, name: str, offset: int, length: int) -> torch.Tensor:
        """Elements ``[offset, offset + length)`` of tensor ``name`` seen flat (a new 1-D tensor)."""
        if name not in self.layout:
            return self.whole_tensors()[name].reshape(-1)[offset: offset + length].clone()
        tensor = self.layout[name]
        out = torch.empty(length, dtype=torch_dtype(tensor.dtype))
        end = offset + length
        for piece in tensor.pieces:
            start, stop = max(offset, piece.offset), min(end, piece.offset + piece.length)
            if start >= stop:
                continue
            source = self._rank_file(piece.rank)[name]
            out[start - offset: stop - offset].copy_(source[start - piece.offset: stop - piece.offset])
        return out

    def whole(self, name: str) -> torch.Tensor:
        if name not in self.layout:
            return self.whole_tensors()[name]
        tensor = self.layout[name]
        return self.range(name, 0, tensor.numel).view(tensor.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the part, whole (for export, sampling, and unsharded strategies)."""
        state = dict(self.whole_tensors())
        for name in self.layout:
            state[name] = self.whole(name)
        return state

    def _rank_file(self, rank: int) -> dict[str, torch.Tensor]:
        if rank not in self._ranks:
            self._ranks[rank] = self.loaded.tensors(rank_part_file(self.part, rank))
        return self._ranks[rank]

    def release(self) -> None:
        self._whole = None
        self._ranks.clear()
