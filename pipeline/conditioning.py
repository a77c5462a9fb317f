"""Class labels from the shards to a class-conditional model: whether a run needs them, and
whether its shards can give them, checked before training (or evaluation) starts.

A model config with ``num_classes`` set is class-conditional (every family has the field); its
training shards must carry ``.cls`` labels (``data-prep digits``, ``data-prep images --labels
folders``, or any WebDataset shards with ``.cls`` members), and a prepared split's manifest must
not hold more classes than the model has. Shards without labels train unconditional models only.
"""

from __future__ import annotations

from pipeline.data import ShardSet, check_shards_match
from pipeline.errors import UserError


def num_classes(model_config) -> int | None:
    """The classes of a model config (None: unconditional)."""
    return getattr(model_config, "num_classes", None)


def check_shards(shards: ShardSet, image_size: int, channels: int, key: str, model_config) -> None:
    """`check_shards_match`, asking for labels when the model is conditional, and the label
    range against ``model.num_classes`` where a manifest says how many classes the shards hold."""
    classes = num_classes(model_config)
    check_shards_match(shards, image_size, channels, key, labels=classes is not None)
    manifest = shards.manifest
    if classes is None or manifest is None or manifest.num_classes <= classes:
        return
    raise UserError(f"{key}: the shards hold {manifest.num_classes} classes (labels 0.."
                    f"{manifest.num_classes - 1}) but model.num_classes is {classes}; set "
                    f"model.num_classes={manifest.num_classes}")


def parse_classes(text: str, classes: int | None) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2], each in 0..classes-1; a UserError naming what is wrong."""
    if classes is None:
        raise UserError("--classes: this run's model is unconditional (model.num_classes is not "
                        "set); sample it without --classes")
    chosen = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"--classes: {part!r} is not a class number (expected e.g. 0,1,2)") from None
        if not 0 <= value < classes:
            raise UserError(f"--classes: class {value} is out of range; this model has classes "
                            f"0..{classes - 1}")
        chosen.append(value)
    return chosen
