"""Sharded checkpoints: every rank writes its own pieces; any process count reads them back.

Unit level (no processes): a tensor split in uneven pieces over N simulated ranks, written through
the real checkpoint format (staged, hashed, committed), reads back whole and in any M-way split;
a whole file (DDP's, a legacy checkpoint's) reads through the same reader; every rank's file is
in the manifest and a changed one is refused.

Job level (slow): for DeepSpeed ZeRO-1, ZeRO-2, ZeRO-3 and FSDP2, a 2-process job of the tiny DDPM
writes a checkpoint, a 1-process job loads it (2 -> 1) and goes on to write its own, which a
2-process job loads (1 -> 2). What each resumed job holds (weights, EMA, AdamW moments and step,
assembled whole by tests/sharded_probe.py: weights and moments through FSDP2's ``full_tensor`` and
DeepSpeed's ``safe_get_full_*``, not the project's layout) must equal the checkpoint's files,
read through the project's layout, bit for bit. Under
ZeRO-3 and FSDP2 no rank writes another's pieces: each rank's files hold exactly its own part.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint, sharding
from pipeline.errors import UserError
from pipeline.sharding import Layout, PartReader, Piece, TensorLayout
from tests.conftest import REPO, run_cli, tiny_overrides
from tests.sharded_probe import assert_holds, expected_state, run_probe

# ---------------------------------------------------------------------------------------------
# The format, without processes


def _split(numel: int, ranks: int) -> list[tuple[int, int]]:
    """ZeRO-3-like: equal partitions, the last ones short or empty."""
    size = -(-numel // ranks)
    return [(min(r * size, numel), max(0, min(size, numel - r * size))) for r in range(ranks)]


def _write_sharded(run_dir: Path, tensors: dict[str, torch.Tensor], ranks: int) -> Path:
    layout = Layout()
    parts: dict = {}
    for rank in range(ranks):
        local = {}
        for name, tensor in tensors.items():
            offset, length = _split(tensor.numel(), ranks)[rank]
            if length:
                local[name] = tensor.reshape(-1)[offset: offset + length]
        parts.update(sharding.piece_files("model", local, rank))
    for name, tensor in tensors.items():
        pieces = tuple(Piece(r, o, n) for r, (o, n) in enumerate(_split(tensor.numel(), ranks)) if n)
        layout[name] = TensorLayout(tuple(tensor.shape), "float32", pieces)
    layout.check()
    parts.update(sharding.shards_file({"model": layout}, ranks))
    parts["model.safetensors"] = ("tensors", {"buffer": torch.arange(3.0)})
    staging = checkpoint.prepare_staging(run_dir, 1)
    records = checkpoint.write_files(staging, checkpoint.encode_parts(parts))
    return checkpoint.commit(run_dir, 1, 1, records, keep_last=2)


def test_pieces_from_n_ranks_read_back_whole_and_in_any_split(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"conv.weight": torch.randn(5, 3, 3, 3, generator=generator), "bias": torch.randn(7, generator=generator),
               "tiny": torch.randn(1, generator=generator)}
    path = _write_sharded(tmp_path / "run", tensors, ranks=3)
    loaded = checkpoint.open_checkpoint(path)
    assert {f"model.rank-{r:05d}.safetensors" for r in range(3)} <= set(loaded.manifest["files"])
    reader = PartReader(loaded, "model")
    assert reader.sharded and reader.shapes()["conv.weight"] == (5, 3, 3, 3)
    for name, tensor in tensors.items():
        assert torch.equal(reader.whole(name), tensor)
        for ranks in (1, 2, 4, 5):  # any other process count reads its own ranges
            got = torch.cat([reader.range(name, offset, length) for offset, length in _split(tensor.numel(), ranks)])
            assert torch.equal(got, tensor.reshape(-1)), (name, ranks)
    assert torch.equal(reader.state_dict()["buffer"], torch.arange(3.0))


def test_a_rank_reads_only_the_files_its_range_overlaps(tmp_path):
    tensor = torch.arange(12.0)
    loaded = checkpoint.open_checkpoint(_write_sharded(tmp_path / "run", {"w": tensor}, ranks=4))
    reader = PartReader(loaded, "model")
    assert torch.equal(reader.range("w", 3, 3), tensor[3:6])  # rank 1's piece alone
    assert loaded.bytes_read == (tmp_path / "run" / "checkpoints" / "step-000000001" / "shards.json").stat().st_size \
        + (tmp_path / "run" / "checkpoints" / "step-000000001" / "model.rank-00001.safetensors").stat().st_size


def test_a_whole_file_reads_through_the_same_reader(tmp_path):
    tensors = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    staging = checkpoint.prepare_staging(tmp_path, 2)
    records = checkpoint.write_files(staging, checkpoint.encode_parts({"model.safetensors": ("tensors", tensors)}))
    reader = PartReader(checkpoint.open_checkpoint(checkpoint.commit(tmp_path, 2, 2, records, 2)), "model")
    assert not reader.sharded and reader.exists
    assert torch.equal(reader.range("w", 5, 6), tensors["w"].reshape(-1)[5:11])
    assert not PartReader(checkpoint.open_checkpoint(tmp_path / "checkpoints" / "step-000000002"), "ema").exists


def test_a_changed_rank_file_is_refused(tmp_path):
    path = _write_sharded(tmp_path / "run", {"w": torch.arange(10.0)}, ranks=2)
    loaded = checkpoint.open_checkpoint(path)
    victim = path / "model.rank-00001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.rank-00001.safetensors does not match its sha256"):
        PartReader(loaded, "model").whole("w")
    with pytest.raises(ValueError, match="does not match its sha256"):
        checkpoint.verify(path)


def test_a_layout_read_from_disk_that_does_not_tile_is_refused(tmp_path):
    # A gap would leave uninitialised memory in the tensor read back: refused in one line.
    parts = sharding.piece_files("model", {"w": torch.arange(4.0)}, 0)
    parts.update(sharding.piece_files("model", {"w": torch.arange(5.0, 10.0)}, 1))
    gap = Layout({"w": TensorLayout((10,), "float32", (Piece(0, 0, 4), Piece(1, 5, 5)))})
    parts.update(sharding.shards_file({"model": gap}, 2))
    staging = checkpoint.prepare_staging(tmp_path, 1)
    path = checkpoint.commit(tmp_path, 1, 1, checkpoint.write_files(staging, checkpoint.encode_parts(parts)), 2)
    with pytest.raises(UserError, match=r"shards.json: layout of w: pieces .* do not tile 10 elements"):
        PartReader(checkpoint.open_checkpoint(path), "model")


def test_a_file_the_manifest_does_not_list_is_not_read(tmp_path):
    path = _write_sharded(tmp_path / "run", {"w": torch.arange(10.0)}, ranks=2)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["model.rank-00001.safetensors"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="model.rank-00001.safetensors is not listed in"):
        PartReader(checkpoint.open_checkpoint(path), "model").whole("w")


def test_a_layout_that_does_not_tile_is_a_bug():
    with pytest.raises(AssertionError, match="do not tile"):
        Layout({"w": TensorLayout((10,), "float32", (Piece(0, 0, 6), Piece(1, 5, 5)))}).check()
    with pytest.raises(AssertionError, match="do not tile"):
        Layout({"w": TensorLayout((10,), "float32", (Piece(0, 0, 4), Piece(1, 5, 5)))}).check()


# ---------------------------------------------------------------------------------------------
# Real jobs: N -> M and back, for every strategy that shards

DDPM = REPO / "configs" / "tiny" / "ddpm.yaml"
SMALL = {
    "model.base_channels": 8, "model.norm_groups": 4, "model.sample_steps": 2,
    "train.warmup_steps": 1, "train.log_every_steps": 1, "checkpoint.every_steps": 2, "checkpoint.keep_last": 5,
    "sample.at_end": "false",
}
STRATEGIES = {
    "zero1": {"distributed.strategy": "deepspeed", "deepspeed.zero_stage": 1},
    "zero2": {"distributed.strategy": "deepspeed", "deepspeed.zero_stage": 2},
    "zero3": {"distributed.strategy": "deepspeed", "deepspeed.zero_stage": 3},
    "fsdp": {"distributed.strategy": "fsdp"},
}


def _overrides(digits_dir: Path, run_dir: Path, strategy: str, steps: int, nproc: int) -> list[str]:
    # The same global batch (8) on any process count: what a resumed run's data stream needs.
    return tiny_overrides(digits_dir, run_dir, **{**SMALL, **STRATEGIES[strategy], "train.max_steps": steps,
                                                  "data.batch_size": 8 // nproc})


def _train(digits_dir: Path, run_dir: Path, strategy: str, steps: int, nproc: int) -> str:
    result = run_cli("launch", "local", "--nproc", str(nproc), str(DDPM),
                     *_overrides(digits_dir, run_dir, strategy, steps, nproc))
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def _probe(digits_dir: Path, run_dir: Path, strategy: str, steps: int, nproc: int, out: Path) -> None:
    """tests/sharded_probe.py as the nproc processes of a job resuming run_dir."""
    run_probe(run_dir, _overrides(digits_dir, run_dir, strategy, steps, nproc), nproc, out)


def _expected(step_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    return expected_state(step_dir)


def _assert_holds(probe: Path, step_dir: Path) -> None:
    assert_holds(probe, step_dir)


def _own_pieces_only(step_dir: Path, world_size: int) -> None:
    """Each rank's files hold exactly the pieces the layout gives that rank."""
    index = json.loads((step_dir / "shards.json").read_text())
    assert index["world_size"] == world_size
    for part, tensors in index["parts"].items():
        for rank in range(world_size):
            held = load_file(step_dir / sharding.rank_part_file(part, rank))
            mine = {name: piece[2] for name, t in tensors.items() for piece in t["pieces"] if piece[0] == rank}
            assert {name: tensor.numel() for name, tensor in held.items()} == mine, (part, rank)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3", "fsdp"])
def test_n_to_m_and_back_resumes_everything(strategy, digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    _train(digits_dir, run_dir, strategy, steps=2, nproc=2)
    two = checkpoint.checkpoints_dir(run_dir) / "step-000000002"
    manifest = json.loads((two / "manifest.json").read_text())
    assert {f"optimizer.rank-{r:05d}.safetensors" for r in (0, 1)} <= set(manifest["files"])
    if strategy in ("zero3", "fsdp"):
        _own_pieces_only(two, 2)
        assert {f"{part}.rank-{r:05d}.safetensors" for part in ("model", "ema") for r in (0, 1)} <= set(
            manifest["files"]
        )
    else:  # ZeRO-1/2 modules hold whole weights anyway: weights and EMA stay whole files
        assert "model.rank-00000.safetensors" not in manifest["files"]

    _probe(digits_dir, run_dir, strategy, 4, nproc=1, out=tmp_path / "two_to_one.safetensors")
    _assert_holds(tmp_path / "two_to_one.safetensors", two)

    output = _train(digits_dir, run_dir, strategy, steps=4, nproc=1)
    assert f"resumed from {two}" in output
    four = checkpoint.checkpoints_dir(run_dir) / "step-000000004"
    assert json.loads((four / "trainer.json").read_text())["world_size"] == 1
    _probe(digits_dir, run_dir, strategy, 6, nproc=2, out=tmp_path / "one_to_two.safetensors")
    _assert_holds(tmp_path / "one_to_two.safetensors", four)

    # Export assembles whole weights in one process, with no process group.
    exported = tmp_path / "exported.safetensors"
    result = run_cli("launch", "export", str(run_dir), "--out", str(exported))
    assert result.returncode == 0, result.stderr
    expected, _ = _expected(four)
    got = load_file(exported)
    assert got.keys() == {k.removeprefix("ema/") for k in expected if k.startswith("ema/")}
    assert all(torch.equal(got[k], expected[f"ema/{k}"]) for k in got)
    # So do `launch sample RUN_DIR` and `launch eval RUN_DIR` (launch/weights.py's load_model).
    from launch.weights import load_model

    model, _, _ = load_model(run_dir, use_ema=False)
    assert all(torch.equal(v, expected[f"model/{k}"]) for k, v in model.state_dict().items())
