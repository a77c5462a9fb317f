"""A run's weights outside training: load them for sampling and evaluation, export them to a file.

Every command that reads a run (``launch sample``, ``eval``, ``export``) finds its checkpoint here:
the one named with ``--checkpoint``, else the run directory's newest intact checkpoint
(`RunDir.latest_checkpoint`, the same one training resumes from), verified either way.

``launch export`` writes one safetensors file of the model's plain state_dict (the EMA weights by
default) with the resolved run config in its metadata, whatever strategy trained the run: DDP's
whole files, or the per-rank pieces of ZeRO-3 and FSDP2 (pipeline/sharding.py), assembled here
in this one process, without a process group. ``launch sample model.safetensors`` then needs
nothing else, and neither DeepSpeed nor torch.distributed.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch

from pipeline import checkpoint, models
from pipeline import config as config_module
from pipeline.checkpoint import LoadedCheckpoint
from pipeline.config import RunConfig
from pipeline.errors import UserError
from pipeline.rundir import RunDir, atomic_write
from pipeline.sharding import PartReader
from pipeline.strategies.base import load_module_state

WEIGHTS_FORMAT = "genpipe-weights/1"


def load_run_config(run_dir: str | Path) -> RunConfig:
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not run.config_path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    return config_module.load(run.config_path)


def run_checkpoint(run_dir: str | Path, checkpoint_path: str | None = None) -> LoadedCheckpoint:
    """The given checkpoint directory, else the run's newest intact one (verified either way)."""
    if checkpoint_path is not None:
        return checkpoint.open_checkpoint(checkpoint_path)
    found = RunDir(run_dir).latest_checkpoint()
    if found is None:
        raise UserError(f"{run_dir}: no intact checkpoint (has it trained yet?)")
    return LoadedCheckpoint(*found)


def _weights_name(loaded: LoadedCheckpoint, use_ema: bool) -> str:
    return "ema" if use_ema and PartReader(loaded, "ema").exists else "model"


def whole_weights(loaded: LoadedCheckpoint, which: str) -> dict:
    """The ``model`` or ``ema`` state_dict of a checkpoint, whole, however it was written."""
    return PartReader(loaded, which).state_dict()


def load_model(run_dir: str | Path, use_ema: bool = True, checkpoint_path: str | None = None, device: str = "cpu"):
    """(model in eval mode, manifest or metadata, config) for a run directory, or for a weights
    file written by ``launch export`` (which carries its config)."""
    if Path(run_dir).is_file():
        return load_weights_file(run_dir, device)
    config = load_run_config(run_dir)
    loaded = run_checkpoint(run_dir, checkpoint_path)
    model = models.build(config.model, config.data.image_size, config.data.channels)
    load_module_state(model, whole_weights(loaded, _weights_name(loaded, use_ema)), loaded.path)
    model.to(device).eval()
    return model, loaded.manifest, config


def export_weights(run_dir: str, out: str, use_ema: bool = True, checkpoint_path: str | None = None) -> Path:
    config = load_run_config(run_dir)
    loaded = run_checkpoint(run_dir, checkpoint_path)
    which = _weights_name(loaded, use_ema)
    tensors = whole_weights(loaded, which)
    # Fail here, not at sampling time, if the weights do not fit the config's architecture.
    model = models.build(config.model, config.data.image_size, config.data.channels)
    load_module_state(model, tensors, loaded.path)
    metadata = {
        "format": WEIGHTS_FORMAT,
        "family": config.model.family,
        "weights": which,
        "step": str(loaded.manifest["step"]),
        "images_seen": str(loaded.manifest["images_seen"]),
        "strategy": str(loaded.manifest.get("strategy", "ddp")),
        "zero_stage": str(loaded.manifest.get("zero_stage")),
        "config": config_module.dump_yaml(config),
    }
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write(out, data)


def load_weights_file(path: str | Path, device: str = "cpu"):
    """(model in eval mode, metadata, config) from an exported weights file."""
    import yaml

    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise UserError(f"{path}: not a safetensors weights file ({type(exc).__name__})") from None
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise UserError(f"{path}: not a file written by `launch export` (no {WEIGHTS_FORMAT} metadata)")
    config = config_module.validate(yaml.safe_load(metadata["config"]), f"{path} (embedded config)")
    model = models.build(config.model, config.data.image_size, config.data.channels)
    load_module_state(model, safetensors.torch.load_file(str(path)), path)
    model.to(device).eval()
    return model, metadata, config
