"""Model families behind one interface (`base.GenerativeModel`), built from their config section.

Each family module defines ``<Family>Config`` (a `StrictModel` whose ``family`` field is the
discriminator) and a model class taking ``(config, image_size, channels)``.
"""

from __future__ import annotations

import importlib
import inspect
import typing

from pydantic import AfterValidator, ValidationError, create_model

from pipeline.configbase import StrictModel
from pipeline.models.base import GenerativeModel

# family name -> (module, config class, model class); modules are imported on first use.
FAMILIES: dict[str, tuple[str, str, str]] = {
    "diffusion": ("pipeline.models.diffusion", "DiffusionConfig", "DiffusionModel"),
    "autoregressive": ("pipeline.models.autoregressive", "PixelCNNConfig", "PixelCNNModel"),
    "vae": ("pipeline.models.vae", "VAEConfig", "VAEModel"),
    "flow": ("pipeline.models.flow", "FlowConfig", "FlowModel"),
    "autoencoder": ("pipeline.models.autoencoder", "AutoencoderConfig", "AutoencoderModel"),
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


# Bounds that sampling options of these names have in every family: (lowest, inclusive).
_OPTION_BOUNDS = {"steps": (0, False), "batch_size": (0, False), "temperature": (0, False), "eta": (0, True),
                  "guidance": (0, True)}


def _bounded(name: str):
    lowest, inclusive = _OPTION_BOUNDS[name]

    def check(value):
        if value is not None and (value < lowest or (value == lowest and not inclusive)):
            raise ValueError(f"must be {'at least' if inclusive else 'greater than'} {lowest}")
        return value

    return AfterValidator(check)


NOT_OPTIONS = ("labels",)
"""Parameters of ``sample`` that are not sampling options: the classes come from ``launch sample
--classes`` or the grid's rows, never from ``sample.options``."""


def sample_options_model(family: str) -> type[StrictModel]:
    """The typed sampling options of a family, read off its ``sample`` signature: every keyword
    after ``(n, generator)`` but ``labels``, with its annotation and default (unknown names are
    errors)."""
    module_name, _, model_name = FAMILIES[family]
    model_class = getattr(importlib.import_module(module_name), model_name)
    hints = typing.get_type_hints(model_class.sample)
    fields = {}
    for name, parameter in list(inspect.signature(model_class.sample).parameters.items())[3:]:
        if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) or name in NOT_OPTIONS:
            continue
        annotation = hints.get(name, typing.Any)
        if name in _OPTION_BOUNDS:
            annotation = typing.Annotated[annotation, _bounded(name)]
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        fields[name] = (annotation, default)
    return create_model(f"{model_class.__name__}SampleOptions", __base__=StrictModel, **fields)


def check_sample_options(family: str, options: dict, model_config=None) -> dict:
    """``options`` validated against the family's sampling options; ValueError naming the option.

    With the model's config, also what the options mean for that model (a family's model class
    may define ``check_sample_options(config, options)``: diffusion refuses a DDPM sampler for a
    flow-matching model and guidance for an unconditional one)."""
    model = sample_options_model(family)
    try:
        validated = model.model_validate(options)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            raise ValueError(f"unknown sampling option {name!r} for the {family} family "
                             f"(options: {', '.join(model.model_fields) or 'none'})") from None
        message = error["msg"].removeprefix("Value error, ")
        raise ValueError(f"sampling option {name}: {message} (got {error.get('input')!r})") from None
    checked = {name: getattr(validated, name) for name in options}
    if model_config is not None:
        module_name, _, model_name = FAMILIES[family]
        model_class = getattr(importlib.import_module(module_name), model_name)
        check = getattr(model_class, "check_sample_options", None)
        if check is not None:
            check(model_config, checked)
    return checked
