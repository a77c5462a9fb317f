"""Latent diffusion's data: an autoencoder run as the first stage, and latent shards.

`data-prep latents AE_RUN SHARDS OUT` (data_prep/latents.py) encodes image shards with an
autoencoder run (pipeline/models/autoencoder.py) into latent shards: per sample
``<key>.latent.npy``, an fp16 array of the posterior's moments ``[2c, h, w]`` (mean, then
log-variance) or of its mean alone ``[c, h, w]``, beside the sample's ``.cls`` and ``.json``. The
split's manifest has ``kind: "latents"``, ``image_size``/``channels`` of the latent grid, and a
``latents`` object (`LatentInfo`) naming the autoencoder run, the sha256 of its checkpoint, the
latent shape and the scale factor 1/std of the latents on the data (LDM sec. 4.3.2: the diffusion
model then sees roughly unit variance).

The loader (pipeline/data.py) delivers the stored fp16 arrays as they are, no image decoding; a
diffusion model with ``model.autoencoder`` set (pipeline/models/diffusion.py) draws
z = μ + σ·ε from the moments on the device, multiplies by its ``latent_scale`` buffer (set from the
manifest by `check_latent_data` at the start of training, then saved in every checkpoint), and
decodes its samples through the autoencoder back to uint8 images.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError

LATENT_MEMBER = "latent.npy"
STORED = ("moments", "mean")


@dataclass(frozen=True)
class LatentInfo:
    """The ``latents`` object of a latent split's manifest."""

    autoencoder: str  # the autoencoder's run directory, as given to data-prep latents
    checkpoint: str  # the checkpoint directory whose weights encoded the split
    checkpoint_sha256: str  # `checkpoint_sha256` of that checkpoint
    step: int  # its training step
    stored: str  # "moments": mean and log-variance, [2c, h, w]; "mean": μ alone, [c, h, w]
    latent_shape: tuple[int, int, int]  # (c, h, w) of a latent
    scale_factor: float  # 1 / std of the latents over the encoded train data
    image_size: int  # the images the autoencoder encodes and decodes
    image_channels: int

    @classmethod
    def from_manifest(cls, manifest, where: str) -> LatentInfo:
        try:
            info = cls(**{**manifest.latents, "latent_shape": tuple(manifest.latents["latent_shape"])})
        except (TypeError, KeyError) as exc:
            raise UserError(f"{where}: the manifest's 'latents' object is incomplete or has unknown fields ({exc})") from None
        if info.stored not in STORED:
            raise UserError(f"{where}: latents.stored must be one of {', '.join(STORED)}, got {info.stored!r}")
        return info

    def to_dict(self) -> dict:
        data = asdict(self)
        data["latent_shape"] = list(self.latent_shape)
        return data


# ---------------------------------------------------------------------------------------------
# One sample


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_latent(sample: dict[str, bytes], key: str, url: str) -> np.ndarray:
    """The fp16 array of a latent sample; a UserError naming the shard and key if it has none."""
    data = sample.get(LATENT_MEMBER)
    if data is None:
        raise UserError(f"shard {url}: sample {key} has no .{LATENT_MEMBER} (members: {sorted(sample)}); "
                        "latent shards are written by `data-prep latents`")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise UserError(f"shard {url}: sample {key} has an unreadable .{LATENT_MEMBER} ({exc})") from None
    if array.ndim != 3:
        raise UserError(f"shard {url}: sample {key}'s latent is shaped {array.shape}, expected [C, H, W]")
    return np.ascontiguousarray(array.astype(np.float16, copy=False))


def draw(moments: torch.Tensor, channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = μ + σ·ε (float32) from stored moments [B, 2c, h, w]; a stored mean [B, c, h, w] as it is."""
    moments = moments.float()
    if moments.shape[1] == channels:
        return moments
    mean, logvar = moments.chunk(2, dim=1)
    if generator is None:
        noise = torch.randn_like(mean)
    else:
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * noise


# ---------------------------------------------------------------------------------------------
# The first stage: an autoencoder run


def checkpoint_sha256(manifest: dict) -> str:
    """One hash of a checkpoint: sha256 over its files' names and sha256s (from its manifest)."""
    files = manifest.get("files", {})
    text = json.dumps({name: record["sha256"] for name, record in sorted(files.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class FirstStage:
    model: torch.nn.Module
    run_dir: str
    checkpoint: str
    checkpoint_sha256: str
    step: int
    config: object  # the autoencoder run's RunConfig


def load_autoencoder(run_dir: str | Path, key: str = "model.autoencoder") -> FirstStage:
    """The autoencoder of a run directory (its newest intact checkpoint, EMA weights where kept),
    frozen, in eval mode, on the CPU; a one-line UserError naming ``key`` when it cannot be."""
    from pipeline import config as config_module
    from pipeline import models
    from pipeline.checkpoint import LoadedCheckpoint
    from pipeline.rundir import RunDir
    from pipeline.sharding import PartReader
    from pipeline.strategies.base import load_module_state

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"{key}: {run_dir} is not a directory (the autoencoder's run directory)")
    if not run.config_path.is_file():
        raise UserError(f"{key}: {run_dir} is not a run directory (no config.yaml)")
    config = config_module.load(run.config_path)
    if config.model.family != "autoencoder":
        raise UserError(f"{key}: {run_dir} trained a {config.model.family} model, not an autoencoder "
                        "(model.family: autoencoder)")
    found = run.latest_checkpoint()
    if found is None:
        raise UserError(f"{key}: {run_dir} has no intact checkpoint (train the autoencoder first)")
    loaded = LoadedCheckpoint(*found)
    model = models.build(config.model, config.data.image_size, config.data.channels)
    if not any(parameter.is_meta for parameter in model.parameters()):  # built on the meta device: shapes only
        part = "ema" if PartReader(loaded, "ema").exists else "model"
        load_module_state(model, PartReader(loaded, part).state_dict(), loaded.path)
    model.eval().requires_grad_(False)
    step = int(loaded.manifest.get("step", -1)) if isinstance(loaded.manifest.get("step"), int) else -1
    return FirstStage(model, str(run_dir), str(loaded.path), checkpoint_sha256(loaded.manifest), step, config)


def check_latent_data(model: torch.nn.Module, shards, key: str, *, set_scale: bool) -> None:
    """Latent shards against the model that trains on them, one line naming what is wrong:
    latent shards need a model with ``model.autoencoder`` and the same autoencoder checkpoint
    (its hash), an image model needs image shards. With ``set_scale`` (a fresh start) the
    model's ``latent_scale`` takes the manifest's scale factor."""
    manifest = shards.manifest
    is_latent = manifest is not None and manifest.kind == "latents"
    first_stage = getattr(model, "first_stage", None)
    if not is_latent:
        if first_stage is not None and manifest is not None:
            raise UserError(f"{key}: these shards hold images, and model.autoencoder makes this a latent "
                            "diffusion model; point it at the output of `data-prep latents`")
        return
    info = LatentInfo.from_manifest(manifest, key)
    if first_stage is None:
        raise UserError(f"{key}: these are latent shards (of {info.autoencoder}); set model.autoencoder "
                        f"to that autoencoder's run directory so samples decode to images")
    if info.checkpoint_sha256 != model.first_stage_sha256:
        raise UserError(f"{key}: the latents were encoded by {info.checkpoint} (sha256 "
                        f"{info.checkpoint_sha256[:12]}), but model.autoencoder's newest checkpoint is "
                        f"{model.first_stage_checkpoint} (sha256 {model.first_stage_sha256[:12]}); encode "
                        "the shards again with `data-prep latents` or point at the right autoencoder run")
    if tuple(info.latent_shape) != tuple(model.image_shape):
        raise UserError(f"{key}: the latents are {tuple(info.latent_shape)} (c, h, w) but the model "
                        f"takes {tuple(model.image_shape)}; set data.image_size={info.latent_shape[1]}")
    if set_scale:
        model.latent_scale.fill_(info.scale_factor)


@dataclass(frozen=True)
class ImageView:
    """Where a run's real images are, for the measures that compare decoded samples with images
    (FID, the digits measures): a latent run's are the image splits its latents came from."""

    train_spec: str
    test_spec: str
    image_size: int
    channels: int


def image_view(data, test_spec: str, test_key: str) -> ImageView:
    """`ImageView` of a run's data section and held-out shard spec: the specs themselves for an
    image run; for latent shards the image split each manifest names as its source."""
    from pipeline.shards import resolve_shards

    test = resolve_shards(test_spec, test_key)
    if test.manifest is None or test.manifest.kind != "latents":
        return ImageView(data.shards, test_spec, data.image_size, data.channels)
    info = LatentInfo.from_manifest(test.manifest, test_key)
    train = resolve_shards(data.shards, "data.shards")
    train_spec = train.manifest.source if train.manifest is not None and train.manifest.kind == "latents" else data.shards
    return ImageView(train_spec, test.manifest.source, info.image_size, info.image_channels)
