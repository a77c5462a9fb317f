"""Training pipeline for image generative models: config, data, models, trainer."""

__version__ = "0.1.0"
