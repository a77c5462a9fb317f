"""pipeline.checkpoint: staged commits, verification, fallback past damaged checkpoints, pruning,
and loading that never executes a pickle.

Checkpoints are written with the module's own functions (prepare_staging, write_files, commit) as
the trainer writes them, then damaged on disk the way crashes and bit rot damage them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.errors import UserError


def model_state(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return {"weight": torch.randn(4, 3, generator=generator), "bias": torch.full((4,), float(step))}


def optimizer_state(step: int) -> dict:
    model = torch.nn.Linear(3, 4)
    with torch.no_grad():
        for name, tensor in model_state(step).items():
            getattr(model, name).copy_(tensor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def save(run_dir: Path, step: int, keep_last: int = 3, files: dict[str, bytes] | None = None) -> Path:
    """One single-rank checkpoint, written as the trainer writes it."""
    staging = checkpoint.prepare_staging(run_dir, step)
    if files is None:
        files = {
            "model.safetensors": checkpoint.encode_tensors(model_state(step)),
            "optimizer.pt": checkpoint.encode_torch(optimizer_state(step)),
            "trainer.json": checkpoint.encode_json({"step": step, "images_seen": step * 8, "world_size": 1}),
            checkpoint.rank_file(0, "json"): checkpoint.encode_json({"data": {"positions": {}}}),
        }
    records = checkpoint.write_files(staging, files)
    return checkpoint.commit(run_dir, step, step * 8, records, keep_last, extra={"world_size": 1})


def latest(run_dir: Path) -> tuple[Path | None, list[str]]:
    messages: list[str] = []
    found = checkpoint.latest_valid(run_dir, warn=messages.append)
    return (found[0] if found else None), messages


def steps_on_disk(run_dir: Path) -> list[int]:
    return [step for step, _ in checkpoint.list_checkpoints(run_dir)]


# --- round trip -----------------------------------------------------------------------------------


def test_commit_verify_load_round_trip(tmp_path):
    path = save(tmp_path, 10)
    assert path == tmp_path / "checkpoints" / "step-000000010"
    assert not list((tmp_path / "checkpoints").glob("*.staging"))

    manifest = checkpoint.verify(path)
    assert manifest["step"] == 10 and manifest["images_seen"] == 80
    assert manifest["format"] == checkpoint.CHECKPOINT_FORMAT
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "trainer.json", "rank-00000.json"}
    for name, record in manifest["files"].items():
        assert (path / name).stat().st_size == record["bytes"]

    found, messages = latest(tmp_path)
    assert found == path and messages == []
    loaded = checkpoint.open_checkpoint(path)
    for name, tensor in model_state(10).items():
        assert torch.equal(loaded.tensors("model.safetensors")[name], tensor)
    restored = loaded.torch_object("optimizer.pt")
    original = optimizer_state(10)
    assert restored["param_groups"] == original["param_groups"]
    for index, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value)
    assert loaded.json("trainer.json") == {"step": 10, "images_seen": 80, "world_size": 1}
    assert loaded.has("optimizer.pt") and not loaded.has("ema.safetensors")


def test_latest_valid_is_the_newest(tmp_path):
    for step in (5, 10, 15):
        save(tmp_path, step)
    found, messages = latest(tmp_path)
    assert found.name == "step-000000015" and messages == []
    assert checkpoint.find_for_run(tmp_path).manifest["step"] == 15


def test_no_checkpoint(tmp_path):
    assert checkpoint.latest_valid(tmp_path) is None
    assert checkpoint.find_for_run(tmp_path) is None


def test_committing_an_existing_step_keeps_the_first(tmp_path):
    first = save(tmp_path, 10)
    digest = checkpoint.verify(first)["files"]["model.safetensors"]["sha256"]
    other = {"model.safetensors": checkpoint.encode_tensors(model_state(99))}
    save(tmp_path, 10, files=other)
    assert checkpoint.verify(first)["files"]["model.safetensors"]["sha256"] == digest
    assert not list((tmp_path / "checkpoints").glob("*.staging"))


# --- damaged checkpoints fall back to the previous one --------------------------------------------


def truncate(path: Path) -> str:
    target = path / "model.safetensors"
    target.write_bytes(target.read_bytes()[:-7])
    return "model.safetensors"


def flip_byte(path: Path) -> str:
    target = path / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return "sha256"


def remove_manifest(path: Path) -> str:
    (path / "manifest.json").unlink()
    return "manifest"


def remove_file(path: Path) -> str:
    (path / "trainer.json").unlink()
    return "trainer.json is missing"


def garble_manifest(path: Path) -> str:
    (path / "manifest.json").write_text('{"format": "genpipe-checkpoint/1", "files": {')
    return "not valid JSON"


def wrong_format(path: Path) -> str:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format"] = "someone-else/7"
    (path / "manifest.json").write_text(json.dumps(manifest))
    return "someone-else/7"


@pytest.mark.parametrize(
    "damage", [truncate, flip_byte, remove_manifest, remove_file, garble_manifest, wrong_format]
)
def test_damaged_newest_is_skipped_with_a_reason(tmp_path, damage):
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    reason = damage(newest)
    found, messages = latest(tmp_path)
    assert found.name == "step-000000010"
    assert len(messages) == 1
    assert str(newest) in messages[0] and reason in messages[0]
    with pytest.raises(UserError) as info:
        checkpoint.open_checkpoint(newest)
    assert str(newest) in str(info.value) and reason in str(info.value)


def test_damage_is_logged_by_default(tmp_path, caplog):
    save(tmp_path, 10)
    flip_byte(save(tmp_path, 20))
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        found = checkpoint.latest_valid(tmp_path)
    assert found[0].name == "step-000000010"
    assert any("step-000000020" in r.getMessage() and "unusable" in r.getMessage() for r in caplog.records)


def test_several_damaged_are_all_skipped(tmp_path):
    save(tmp_path, 10)
    truncate(save(tmp_path, 20))
    remove_manifest(save(tmp_path, 30))
    found, messages = latest(tmp_path)
    assert found.name == "step-000000010"
    assert len(messages) == 2
    assert "step-000000030" in messages[0] and "step-000000020" in messages[1]


def test_all_damaged_gives_none(tmp_path):
    flip_byte(save(tmp_path, 10))
    found, messages = latest(tmp_path)
    assert found is None and len(messages) == 1


def test_staging_dir_left_behind_is_never_loaded(tmp_path):
    save(tmp_path, 10)
    # A crash mid-write: files in the staging directory, no manifest, no rename.
    staging = checkpoint.prepare_staging(tmp_path, 20)
    checkpoint.write_files(staging, {"model.safetensors": checkpoint.encode_tensors(model_state(20))})
    found, _ = latest(tmp_path)
    assert found.name == "step-000000010"
    assert steps_on_disk(tmp_path) == [10]
    checkpoint.remove_staging(tmp_path)
    assert not staging.exists()
    assert (tmp_path / "checkpoints" / "step-000000010").is_dir()


def test_staging_dir_with_complete_manifest_is_never_loaded(tmp_path):
    save(tmp_path, 10)
    later = save(tmp_path, 20)
    # The same bytes as a complete checkpoint, but never renamed: still not committed.
    os.rename(later, checkpoint.staging_path(tmp_path, 20))
    found, _ = latest(tmp_path)
    assert found.name == "step-000000010"


def test_stray_entries_are_ignored(tmp_path):
    save(tmp_path, 10)
    directory = tmp_path / "checkpoints"
    (directory / "step-000000099").write_text("a file, not a directory")
    (directory / "step-12").mkdir()
    (directory / "notes.txt").write_text("hello")
    found, messages = latest(tmp_path)
    assert found.name == "step-000000010" and messages == []


# --- pruning --------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_pruning_keeps_keep_last(tmp_path, keep_last):
    for step in range(1, 7):
        save(tmp_path, step * 10, keep_last=keep_last)
        expected = [s * 10 for s in range(1, step + 1)][-keep_last:]
        assert steps_on_disk(tmp_path) == expected
    for _, path in checkpoint.list_checkpoints(tmp_path):
        checkpoint.verify(path)


def test_pruning_never_removes_before_the_new_one_is_complete(tmp_path):
    save(tmp_path, 10, keep_last=1)
    staging = checkpoint.prepare_staging(tmp_path, 20)
    records = checkpoint.write_files(staging, {"model.safetensors": checkpoint.encode_tensors(model_state(20))})
    # Everything written but not committed: the old checkpoint is still there and loadable.
    assert steps_on_disk(tmp_path) == [10]
    assert latest(tmp_path)[0].name == "step-000000010"
    checkpoint.commit(tmp_path, 20, 160, records, keep_last=1)
    assert steps_on_disk(tmp_path) == [20]


def test_incomplete_checkpoints_do_not_count_for_pruning(tmp_path):
    save(tmp_path, 10, keep_last=2)
    remove_manifest(save(tmp_path, 20, keep_last=2))
    save(tmp_path, 30, keep_last=2)
    # 10 and 30 are the two complete ones; the incomplete 20 is not one of the kept two
    assert latest(tmp_path)[0].name == "step-000000030"
    remaining = steps_on_disk(tmp_path)
    assert 10 in remaining and 30 in remaining


# --- loading never unpickles arbitrary objects ----------------------------------------------------


class _Exploit:
    """Unpickling this calls os.system: a tampered optimizer.pt must not get that far."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _malicious_torch_save(marker: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"state": {}, "param_groups": [], "payload": _Exploit(f"touch {marker}")}, buffer)
    return buffer.getvalue()


def _malicious_plain_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Exploit(f"touch {marker}"), protocol=2)


@pytest.mark.parametrize("make", [_malicious_torch_save, _malicious_plain_pickle])
def test_torch_object_refuses_a_malicious_pickle(tmp_path, make):
    marker = tmp_path / "pwned"
    payload = make(marker)
    # Sanity: the payload really would run the command when unpickled unsafely.
    if make is _malicious_plain_pickle:
        probe = tmp_path / "probe"
        pickle.loads(_malicious_plain_pickle(probe))
        assert probe.exists()
        probe.unlink()

    run_dir = tmp_path / "run"
    files = {
        "model.safetensors": checkpoint.encode_tensors(model_state(1)),
        "optimizer.pt": payload,
        "trainer.json": checkpoint.encode_json({"step": 1, "images_seen": 8, "world_size": 1}),
    }
    path = save(run_dir, 1, files=files)
    loaded = checkpoint.open_checkpoint(path)  # the manifest matches: verification passes
    with pytest.raises(UserError) as info:
        loaded.torch_object("optimizer.pt")
    message = str(info.value)
    assert str(path / "optimizer.pt") in message and "refusing" in message
    assert "\n" not in message
    assert not marker.exists()
    # The other files of the checkpoint are still readable.
    assert torch.equal(loaded.tensors("model.safetensors")["bias"], model_state(1)["bias"])


def test_safe_torch_objects_load(tmp_path):
    data = {"a": torch.arange(3), "b": [1, 2.5, "x", None], "c": {"d": (1, 2)}}
    path = save(tmp_path, 1, files={"extra.pt": checkpoint.encode_torch(data)})
    restored = checkpoint.open_checkpoint(path).torch_object("extra.pt")
    assert torch.equal(restored["a"], data["a"])
    assert restored["b"] == data["b"] and restored["c"]["d"] == (1, 2)


def test_open_checkpoint_of_missing_directory(tmp_path):
    with pytest.raises(UserError) as info:
        checkpoint.open_checkpoint(tmp_path / "checkpoints" / "step-000000001")
    assert "step-000000001" in str(info.value)


def test_copied_checkpoint_still_verifies(tmp_path):
    path = save(tmp_path / "a", 10)
    copy = shutil.copytree(path, tmp_path / "b" / "checkpoints" / path.name)
    assert checkpoint.verify(Path(copy))["step"] == 10


def test_each_rank_verifies_a_share_of_the_files_and_every_file_is_someones():
    sizes = {"model.rank-00000.safetensors": 900, "model.rank-00001.safetensors": 900, "ema.safetensors": 500,
             "trainer.json": 10, "rank-00000.json": 20, "rank-00001.json": 20, "shards.json": 5}
    manifest = {"files": {name: {"bytes": size, "sha256": "-"} for name, size in sizes.items()}}
    for world_size in (1, 2, 3, 8):
        shares = [checkpoint.share_of_files(manifest, rank, world_size) for rank in range(world_size)]
        assert sorted(name for share in shares for name in share) == sorted(sizes)  # each file once
        loads = [sum(sizes[name] for name in share) for share in shares]
        assert max(loads) <= max(sizes.values()) + sum(sizes.values()) / world_size
    assert [sum(sizes[n] for n in checkpoint.share_of_files(manifest, r, 2)) for r in (0, 1)] == [1400, 955]


@pytest.mark.slow
def test_a_file_only_rank_1_verifies_still_sets_the_checkpoint_aside(ddp_reference, digits_dir, tmp_path):
    """Two processes resume; the damaged file of the newest checkpoint is in rank 1's share of the
    verification, and the job goes back to the checkpoint before it, saying why."""
    from runs import SHARDED, Job

    run_dir = tmp_path / "run"
    shutil.copytree(ddp_reference, run_dir)
    newest = checkpoint.checkpoints_dir(run_dir) / "step-000000006"
    manifest = json.loads((newest / "manifest.json").read_text())
    damaged = checkpoint.share_of_files(manifest, 1, 2)[0]
    with open(newest / damaged, "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]))
    job = Job(digits_dir, run_dir, **SHARDED)
    assert job.wait() == 0, job.output()[-4000:]
    output = job.output()
    assert f"checkpoint {newest} is unusable: {damaged} does not match its sha256" in output, output[-4000:]
    assert "resumed from" in output and "step-000000003 (step 3," in output, output[-4000:]
