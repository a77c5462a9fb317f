"""Model families behind one interface (`base.GenerativeModel`), built from their config section.

Each family module defines ``<Family>Config`` (a `StrictModel` whose ``family`` field is the
discriminator) and a model class taking ``(config, image_size, channels)``.
"""

from __future__ import annotations

import importlib

from pipeline.models.base import GenerativeModel

# family name -> (module, config class, model class); modules are imported on first use.
FAMILIES: dict[str, tuple[str, str, str]] = {
    "diffusion": ("pipeline.models.diffusion", "DiffusionConfig", "DiffusionModel"),
    "autoregressive": ("pipeline.models.autoregressive", "PixelCNNConfig", "PixelCNNModel"),
    "vae": ("pipeline.models.vae", "VAEConfig", "VAEModel"),
    "flow": ("pipeline.models.flow", "FlowConfig", "FlowModel"),
}


def config_classes() -> list[type]:
    """The config class of every registered family, for the discriminated union in config.py."""
    out = []
    for module_name, config_name, _ in FAMILIES.values():
        out.append(getattr(importlib.import_module(module_name), config_name))
    return out


def build(config, image_size: int, channels: int) -> GenerativeModel:
    """The model described by a validated model config section."""
    module_name, _, model_name = FAMILIES[config.family]
    model_class = getattr(importlib.import_module(module_name), model_name)
    return model_class(config, image_size=image_size, channels=channels)
