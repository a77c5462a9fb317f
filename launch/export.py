"""``launch export``: one consolidated safetensors file of a run's full weights.

Whatever strategy trained the run (DDP, or DeepSpeed ZeRO-1/2/3, whose checkpoints already hold
whole fp32 weights, see pipeline/deepspeed_engine.py), the file holds the model's plain
state_dict (the EMA weights by default) and, in its metadata, the resolved run config, so
``launch sample model.safetensors`` needs nothing else and no DeepSpeed.
"""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch

from pipeline import config as config_module, models
from pipeline.errors import UserError

WEIGHTS_FORMAT = "genpipe-weights/1"


def export_weights(run_dir: str, out: str, use_ema: bool = True, checkpoint_path: str | None = None) -> Path:
    from launch.sample import load_run_config, run_checkpoint

    config = load_run_config(run_dir)
    loaded = run_checkpoint(run_dir, checkpoint_path)
    which = "ema" if use_ema and loaded.has("ema.safetensors") else "model"
    tensors = loaded.tensors(f"{which}.safetensors")
    # Fail here, not at sampling time, if the weights do not fit the config's architecture.
    model = models.build(config.model, config.data.image_size, config.data.channels)
    model.load_state_dict(tensors)
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
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_path.with_name(out_path.name + ".tmp")
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, out_path)
    return out_path


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
    model.load_state_dict(safetensors.torch.load_file(str(path)))
    model.to(device).eval()
    return model, metadata, config
