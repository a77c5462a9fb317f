"""Base class for typed config sections.

Every section of a run's config is a `StrictModel`: unknown keys are errors (a typo never goes
silently unused), and a validated config is frozen (nothing changes it behind the trainer's
back). Each component declares its own section next to its code and documents every field there.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section: unknown keys rejected, immutable once validated."""

    # Numbers given where text is expected (``run_dir=123``, ``wandb.name: 1.5``) are the text.
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, coerce_numbers_to_str=True
    )
