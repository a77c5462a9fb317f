"""A run's configuration: YAML validated into typed, frozen sections.

``load(path, overrides)`` reads a YAML file, applies ``key.sub=value`` overrides from the command
line, and validates the result into a `RunConfig`. Anything wrong (a YAML syntax error, an
unknown key, a wrong type, an impossible value) raises one `UserError` line naming the file, the
key and what was expected, before any process starts or anything is written.

Each section is declared here with its fields documented in place; the model section is the
family's own config class (``pipeline/models/<family>.py``), chosen by ``model.family``.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline import models
from pipeline.configbase import StrictModel
from pipeline.errors import UserError


def _yaml_no(value: Any) -> Any:
    # YAML 1.1 reads a bare `no` as False; `mixed_precision: no` means the string.
    return "no" if value is False else value


class DataConfig(StrictModel):
    """Where the images come from and how they are batched."""

    shards: str | list[str]
    """Training shards: a prepared split directory (with manifest.json), any directory of
    ``.tar`` shards (img2dataset's output, for one), a brace pattern
    (``data/shard-{000000..000127}.tar``) or glob, a list of these, ``pipe:`` commands, or
    ``http(s)://``, ``s3://``, ``gs://`` URLs of the same forms (object stores through fsspec and
    its backend: s3fs, gcsfs). Remote shards are downloaded a shard ahead and retried on failure."""
    eval_shards: str | list[str] | None = None
    """Held-out shards for bits/dim evaluation, in the same forms; None disables evaluation."""
    image_size: int = Field(gt=0)
    """Height and width of the images trained on, in pixels. Images stored at another size or
    shape are resized at load time (shorter side to image_size, then a square crop: ``crop``)."""
    channels: Literal[1, 3]
    """1 for grayscale, 3 for RGB; images stored otherwise are converted at load time."""
    batch_size: int = Field(gt=0)
    """Images per process per micro-batch. Global batch = batch_size × processes × grad_accum."""
    num_workers: int = Field(default=2, ge=0)
    """Data loader worker processes per training process (0 reads in the training process). Each
    reads an equal share of the process's canonical partitions, so at most that many work (the
    largest divisor of the partitions per process not above this number)."""
    canonical_partitions: int | None = Field(default=None, gt=0)
    """Streams the shard list is read as, fixed for the life of a run: every global batch takes
    the same number of samples from each, so the samples of step k are a function of the seed and
    k alone, and a run resumes exactly on any process count that divides this number (when it
    divides the global batch). None: the readers of the run's first start (processes ×
    num_workers), recorded in its checkpoints. Each needs its own shard; see docs/data.md."""
    shuffle_buffer: int = Field(default=1000, ge=1)
    """Samples held in each canonical partition's shuffle buffer (1 disables sample shuffling)."""
    random_flip: bool = False
    """Flip each training image horizontally with probability 1/2 (deterministic per sample)."""
    crop: Literal["center", "random"] = "center"
    """Where the square is cut from an image that is not square once its shorter side is
    image_size: the centre, or a place drawn per sample and epoch from the sample's identity
    (so resume and process count never change it). Held-out images are always centre-cropped."""
    shard_prefetch: int = Field(default=1, ge=1)
    """Remote shards (s3://, http(s)://, ...) each reader downloads ahead of the one it reads."""
    shard_attempts: int = Field(default=5, ge=1)
    """Downloads of a remote shard before its failure stops the run (backoff 1 s, doubling)."""
    prefetch_factor: int = Field(default=4, ge=1)
    """Batches' worth of samples each worker prepares ahead."""


class TrainConfig(StrictModel):
    """The optimisation: steps, AdamW, schedule, precision, EMA."""

    max_steps: int = Field(gt=0)
    """Optimizer steps to train for (each step sees the global batch)."""
    lr: float = Field(gt=0)
    """Peak learning rate of AdamW."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up from 0 to ``lr`` over this many steps."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: keep ``lr`` or decay it along a cosine to ``min_lr_ratio × lr`` at max_steps."""
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value; None disables clipping (the norm is still logged)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast dtype for the forward pass; fp16 adds dynamic loss scaling."""
    ema_halflife_images: float | None = Field(default=None, gt=0)
    """EMA half-life measured in images seen (EDM's convention: independent of batch size and
    process count). DDPM's decay 0.9999 at batch 128 is ~887k images. None disables EMA."""
    ema_rampup_ratio: float | None = Field(default=None, gt=0)
    """If set, the half-life is at most this fraction of the images seen so far (EDM's ramp-up),
    so early EMA weights are not dominated by the random initialisation."""
    log_every_steps: int = Field(default=10, ge=1)
    """Steps between metric lines (metrics.jsonl, W&B, progress bar). Metrics are averaged over
    the interval and over processes; the device is synchronised only at these steps."""
    signal_check_every_steps: int = Field(default=1, ge=1)
    """Steps between checks, agreed by all processes, of whether a stop signal arrived."""
    compile: bool = False
    """torch.compile the training forward (the model's loss, noise sampling included): one graph
    without breaks on a single process (``fullgraph``); under DDP, compiled around the DDP wrapper
    so its graph is split at gradient-bucket boundaries and communication overlaps the backward.
    The first steps pay the compilation (tens of seconds on a GPU)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode: ``reduce-overhead`` replays CUDA graphs (helps small models whose
    step is dominated by kernel launches), ``max-autotune`` also searches kernel configurations."""
    channels_last: bool = False
    """Keep weights and activations in channels-last (NHWC) memory layout, which the tensor-core
    convolution kernels prefer; whether it is faster depends on the network: measure
    (benchmarks/train_step.py --channels-last)."""
    deterministic: bool = False
    """Ask PyTorch for deterministic kernels (slower on GPU; bit-exact resume needs it)."""
    max_bad_steps: int = Field(default=20, ge=1)
    """A step whose loss or gradient is not finite is skipped (weights and optimizer untouched)
    and counted; after this many consecutive skipped steps the run stops with an error, leaving
    its last checkpoint as it was. fp16 overflow skips count too (the loss scale recovers from a
    few). Checked at every ``log_every_steps`` boundary and before each checkpoint, so the host
    never waits for the device inside a step."""

    _no = field_validator("mixed_precision", mode="before")(_yaml_no)


class CheckpointConfig(StrictModel):
    """When checkpoints are written and how many are kept."""

    every_steps: int = Field(default=1000, ge=1)
    """Steps between checkpoints (one is always written at the end and on a stop signal)."""
    keep_last: int = Field(default=2, ge=1)
    """Complete checkpoints kept; older ones are deleted only after a newer one is complete."""
    async_save: bool = False
    """Write checkpoints on a background thread: training is blocked only while the state is
    copied to host memory (needs that much free host memory); the next save and the end of
    training wait for the write. Same atomicity as a synchronous save (docs/checkpoints.md)."""


class SampleConfig(StrictModel):
    """Sample grids written during training."""

    every_steps: int = Field(default=1000, ge=0)
    """Steps between sample grids during training (0: none during training)."""
    at_end: bool = True
    """Draw a grid when training finishes (after the final checkpoint; a stop signal during it
    skips it). ``every_steps: 0`` with ``at_end: false`` draws no grids at all."""
    n: int = Field(default=64, ge=1)
    """Images per grid."""
    seed: int = 0
    """Seed of the sampling noise: the same seed at every step shows how one set of noise evolves."""
    use_ema: bool = True
    """Sample with the EMA weights when EMA is on."""
    options: dict[str, int | float | str | bool] = Field(default_factory=dict)
    """Family-specific sampling options passed to ``model.sample`` (e.g. ``sampler: ddim``,
    ``steps: 50`` for diffusion; ``temperature: 0.7`` for flows)."""


class EvalConfig(StrictModel):
    """Held-out bits/dim and sample quality (FID/KID, the digits measures) during training."""

    every_steps: int = Field(default=0, ge=0)
    """Steps between evaluations on ``data.eval_shards`` (0 disables in-training evaluation)."""
    max_images: int | None = Field(default=None, gt=0)
    """Evaluate on at most this many held-out images (None: the whole held-out set)."""
    batch_size: int | None = Field(default=None, gt=0)
    """Per-process evaluation batch size (None: data.batch_size)."""
    use_ema: bool = True
    fid_images: int = Field(default=0, ge=0)
    """Generated images per in-training FID/KID evaluation, shared out over the processes
    (0: no FID in training). Reference: ``data.eval_shards``. Use more images than the feature
    dimension (2048 for Inception) or FID is biased upward; 10k-50k for numbers to publish."""
    fid_every_steps: int = Field(default=0, ge=0)
    """Steps between FID/KID evaluations when ``fid_images`` > 0 (0: every ``every_steps``)."""
    fid_reference_images: int | None = Field(default=None, gt=0)
    """Held-out images in the reference statistics (None: all of ``data.eval_shards``). The
    statistics are cached beside the shards' manifest as ``fid_stats-<network id>.npz``."""
    inception_weights: str | None = None
    """Local file of the FID Inception-v3 weights (pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` or a safetensors copy); nothing is downloaded."""
    fid_feature_network: Literal["inception", "random_conv"] = "inception"
    """Feature network of FID/KID: ``inception`` (the standard, needs ``inception_weights``) or
    ``random_conv``, a fixed random conv net for smoke tests whose numbers compare only with
    themselves."""
    kid_subsets: int = Field(default=100, ge=1)
    """Random subsets averaged by KID."""
    kid_subset_size: int = Field(default=1000, ge=2)
    """Images per KID subset (at most the smaller set's size)."""
    sample_quality_images: int = Field(default=0, ge=0)
    """Generated images per in-training digits sample-quality evaluation (pipeline/digits_quality.py:
    a digits classifier's FD, Inception-style score, confidence and class coverage, logged as
    ``eval/digits_*`` beside the held-out digits' values), shared out over the processes (0: off).
    Needs the labelled splits of ``data-prep digits`` in ``data.shards`` and ``data.eval_shards``."""
    sample_quality_every_steps: int = Field(default=0, ge=0)
    """Steps between digits sample-quality evaluations when ``sample_quality_images`` > 0
    (0: every ``every_steps``)."""

    @model_validator(mode="after")
    def _fid_has_a_schedule(self) -> EvalConfig:
        if self.fid_images == 1:
            raise ValueError("fid_images must be 0 (off) or at least 2")
        if self.fid_images and not (self.every_steps or self.fid_every_steps):
            raise ValueError("fid_images is set but neither every_steps nor fid_every_steps is")
        return self

    @model_validator(mode="after")
    def _sample_quality_has_a_schedule(self) -> EvalConfig:
        if self.sample_quality_images == 1:
            raise ValueError("sample_quality_images must be 0 (off) or at least 2")
        if self.sample_quality_images and not (self.every_steps or self.sample_quality_every_steps):
            raise ValueError("sample_quality_images is set but neither every_steps nor sample_quality_every_steps is")
        return self


class WandbConfig(StrictModel):
    """Weights & Biases tracking."""

    mode: Literal["online", "offline", "disabled"] | None = None
    """None: online when an API key is configured (WANDB_API_KEY or a netrc entry), else offline."""
    project: str = "genpipe"
    entity: str | None = None
    name: str | None = None
    """Display name of the run (default: the run directory's name)."""
    tags: list[str] = Field(default_factory=list)
    log_checkpoints: bool = False
    """Log each committed checkpoint as a W&B artifact (type ``model``) that references its
    directory (``file://``, no upload, no hashing of the files); rank 0 only."""
    peak_tflops: float | None = Field(default=None, gt=0)
    """Peak dense TFLOP/s of one device for the logged MFU (None: the spec sheet figure of a
    known GPU for the autocast dtype; no MFU on CPUs or unknown GPUs). MFU is also written to
    metrics.jsonl, whatever ``mode`` is."""


class DistributedConfig(StrictModel):
    """How processes share the work."""

    strategy: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    """Data-parallel strategy: ``ddp`` (every process holds the whole model and optimizer),
    ``deepspeed`` (ZeRO partitions optimizer state, gradients and, at stage 3, parameters; see
    the ``deepspeed`` section and docs/deepspeed.md) or ``fsdp`` (PyTorch's FSDP2: parameters,
    gradients and optimizer state sharded per block; see the ``fsdp`` section)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: auto picks nccl on GPUs and gloo on CPUs."""
    timeout_minutes: float = Field(default=30, gt=0)
    """How long a collective waits for the other processes before failing."""
    hang_timeout_minutes: float | None = Field(default=None, ge=0)
    """A rank whose training loop makes no progress for this long (stuck in a collective, on a
    data worker, in a deadlock) ends the job with one line naming it, its host and its last step
    (Slurm jobs are requeued). Checkpoints, sample grids and evaluations are not timed. 0: off;
    None: a third of ``timeout_minutes``, at most 10."""

    paused_timeout_minutes: float | None = Field(default=None, ge=0)
    """The deadline of the work the hang timeout does not time (a checkpoint, a sample grid, an
    evaluation, FID): a rank still inside one after this long ends the job as a hang does,
    naming the rank furthest behind (the one that has not reached the collective its peers wait
    in). 0: off (a stuck rank is then left to the collective timeout); None: 0.9 of
    ``timeout_minutes``, so that the rank is named before its peers' collectives fail."""

    def resolved_hang_timeout_minutes(self) -> float:
        if self.hang_timeout_minutes is None:
            return min(10.0, self.timeout_minutes / 3)
        return self.hang_timeout_minutes

    def resolved_paused_timeout_minutes(self) -> float:
        if self.paused_timeout_minutes is None:
            return 0.9 * self.timeout_minutes
        return self.paused_timeout_minutes

    @model_validator(mode="after")
    def _hang_before_collective_timeout(self) -> DistributedConfig:
        for key in ("hang_timeout_minutes", "paused_timeout_minutes"):
            value = getattr(self, key)
            if value is not None and value >= self.timeout_minutes:
                raise ValueError(
                    f"{key} ({value:g}) must be below timeout_minutes "
                    f"({self.timeout_minutes:g}), or a stalled rank fails its peers' collectives first"
                )
        return self


class FSDPConfig(StrictModel):
    """FSDP2 settings, used when ``distributed.strategy`` is ``fsdp`` (docs/architecture.md)."""

    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again for the
    backward (ZeRO-3-like memory); False keeps them until the backward (more memory, less
    communication)."""


DEEPSPEED_OWNED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "fp16", "bf16", "optimizer", "scheduler", "torch_autocast",
)
"""DeepSpeed config keys the trainer derives from the run config (data.batch_size, train.grad_accum,
train.grad_clip, train.mixed_precision, train.lr...); a config_file may not set them."""


class DeepSpeedConfig(StrictModel):
    """ZeRO settings, used when ``distributed.strategy`` is ``deepspeed``."""

    config_file: str | None = None
    """A DeepSpeed JSON file (e.g. ``configs/deepspeed/zero2.json``) whose ``zero_optimization``
    tuning (bucket sizes, overlap, offload) is the base; the keys below override it. Batch sizes,
    accumulation, clipping, precision and the optimizer come from the run config, never the file."""
    zero_stage: Literal[1, 2, 3] | None = None
    """ZeRO stage: 1 partitions optimizer state, 2 also gradients, 3 also parameters.
    None: the config_file's stage, else 2."""
    offload_optimizer: Literal["none", "cpu"] | None = None
    """Keep optimizer state (and the optimizer step) in host memory (DeepSpeedCPUAdam on GPUs).
    None: the config_file's choice, else none."""
    offload_param: Literal["none", "cpu"] | None = None
    """Keep partitioned parameters in host memory (stage 3 only). None: the config_file's
    choice, else none."""

    @model_validator(mode="after")
    def _check_file(self) -> DeepSpeedConfig:
        zero = self.file_zero_section()
        stage = self.resolved_stage()
        if self.offload_param == "cpu" and stage != 3:
            raise ValueError(f"offload_param: cpu needs zero_stage 3 (the stage is {stage})")
        if self.zero_stage is not None and "stage" in zero and zero["stage"] != self.zero_stage:
            raise ValueError(
                f"zero_stage {self.zero_stage} differs from zero_optimization.stage "
                f"{zero['stage']} in {self.config_file}; set one of them"
            )
        return self

    def file_dict(self) -> dict:
        """The parsed config_file ({} without one); ValueError naming the problem."""
        if self.config_file is None:
            return {}
        import json

        path = Path(self.config_file)
        if not path.is_file():
            raise ValueError(f"config_file {path} not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config_file {path} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config_file {path}: expected a JSON object")
        owned = sorted(key for key in raw if key in DEEPSPEED_OWNED_KEYS)
        if owned:
            raise ValueError(
                f"config_file {path} sets {', '.join(owned)}; these come from the run config "
                "(data.batch_size, train.grad_accum, train.grad_clip, train.mixed_precision, "
                "train.lr/betas/eps/weight_decay): remove them from the file"
            )
        return raw

    def file_zero_section(self) -> dict:
        return dict(self.file_dict().get("zero_optimization", {}))

    def resolved_stage(self) -> int:
        return self.zero_stage or int(self.file_zero_section().get("stage", 2))

    def resolved_offload(self, which: str) -> str:
        chosen = getattr(self, f"offload_{which}")
        if chosen is not None:
            return chosen
        section = self.file_zero_section().get(f"offload_{which}") or {}
        return section.get("device", "none")


class SlurmConfig(StrictModel):
    """Resources and policies of ``launch slurm`` jobs (see launch/slurm.py)."""

    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=0, ge=0)
    """GPUs per node; one task per GPU. 0 runs on CPUs with ``tasks_per_node`` processes."""
    tasks_per_node: int | None = Field(default=None, ge=1)
    """Processes per node; defaults to gpus_per_node (or 1 on CPU partitions)."""
    cpus_per_task: int = Field(default=8, ge=1)
    mem: str | None = None
    """Memory per node as sbatch takes it (e.g. ``256G``); None leaves the partition default."""
    time_minutes: int = Field(default=60 * 24, ge=1)
    """Job time limit; the job saves and requeues itself ``signal_delay_s`` before it."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    signal_delay_s: int = Field(default=120, ge=1)
    """Seconds before the time limit at which Slurm sends USR2 (``--signal=USR2@N``)."""
    max_requeues: int = Field(default=10, ge=0)
    """Preemptions / time-outs after which the job is no longer requeued."""
    extra_sbatch: dict[str, str | int | bool] = Field(default_factory=dict)
    """Further sbatch directives, e.g. ``{mail-type: END}``."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run before the tasks start (module loads, env activation)."""

    @model_validator(mode="after")
    def _one_task_per_gpu(self) -> SlurmConfig:
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"tasks_per_node={self.tasks_per_node} with gpus_per_node={self.gpus_per_node}: "
                "GPU jobs run one task per GPU; leave tasks_per_node out"
            )
        return self


ModelConfig = Annotated[
    Union[tuple(models.config_classes())],  # type: ignore[misc]  # noqa: UP007 (a runtime tuple of classes)
    Field(discriminator="family"),
]


class RunConfig(StrictModel):
    """Everything a training run needs; its resolved form is written to ``run_dir/config.yaml``."""

    run_dir: str
    """Directory holding the run's state (config, checkpoints, metrics, samples, W&B id).
    Launching into a run directory that has a checkpoint resumes from it."""
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    wandb: WandbConfig = WandbConfig()
    distributed: DistributedConfig = DistributedConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    fsdp: FSDPConfig = FSDPConfig()
    slurm: SlurmConfig = SlurmConfig()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> RunConfig:
        if self.eval.every_steps and self.data.eval_shards is None:
            raise ValueError("eval.every_steps is set but data.eval_shards is not")
        if self.train.compile and self.distributed.strategy == "deepspeed":
            raise ValueError("train.compile is not supported with distributed.strategy: deepspeed")
        if self.sample.options:
            try:
                models.check_sample_options(self.model.family, dict(self.sample.options), self.model)
            except ValueError as exc:
                raise ValueError(f"sample.options: {exc}") from None
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 0.0001); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise UserError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, _number_from_string(value)


def _number_from_string(value: Any) -> Any:
    # YAML 1.1 reads `1e-4` (no dot) as a string; on the command line it is meant as a number.
    # (Text fields take numbers back as text, see StrictModel.)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number) and any(c in value for c in ".eE"):
            return number
    return value


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """A copy of ``raw`` with each ``key.sub=value`` override applied."""
    result = _deep_copy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"override {text!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node


def _allowed_keys(location: tuple) -> list[str]:
    """Field names valid where an unknown key sits, for 'did you mean' hints.

    ``location`` is pydantic's, which includes the family tag inside the model section
    (``("model", "diffusion", "base_chanels")``).
    """
    cls: Any = RunConfig
    for part in location[:-1]:
        if isinstance(part, int):
            return []
        if part in models.FAMILIES and cls is None:
            cls = next(
                option for option in models.config_classes()
                if option.model_fields["family"].default == part
            )
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, StrictModel):
            cls = annotation
        else:
            cls = None  # a union (the model section): the next part is the family tag
    return list(getattr(cls, "model_fields", {}) or [])


def _format_error(error: dict, source: str) -> str:
    location = tuple(
        part for part in error["loc"] if not (isinstance(part, str) and part in _family_tags())
    )
    key = ".".join(str(p) for p in location) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(tuple(error["loc"]))
        hint = difflib.get_close_matches(str(location[-1]), allowed, n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        expected = f"; allowed here: {', '.join(allowed)}" if allowed and not hint else ""
        return f"{source}: unknown key '{key}'{suggestion}{expected}"
    if kind == "missing":
        return f"{source}: missing required key '{key}'"
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        return (
            f"{source}: {key}: unknown model family {ctx.get('tag')!r}; "
            f"expected one of {ctx.get('expected_tags')}"
        )
    if kind == "union_tag_not_found":
        return f"{source}: {key}: missing 'family' (one of {', '.join(models.FAMILIES)})"
    message = error["msg"].removeprefix("Value error, ")
    if not location:
        return f"{source}: {message}"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: {key}: {message}{got_text}"


def _family_tags() -> set[str]:
    return set(models.FAMILIES)


def validate(raw: Any, source: str) -> RunConfig:
    """A `RunConfig` from a plain dict, or a UserError naming source, key and expectation."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of config sections at the top level")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
        message = _format_error(errors[0], source)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        raise UserError(message) from None


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: invalid YAML: {problem}") from None
    if raw is None:
        raise UserError(f"{path}: the file is empty")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config sections at the top level")
    return raw


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a config file."""
    raw = apply_overrides(read_yaml(path), list(overrides), str(path))
    source = str(path) if not overrides else f"{path} (with overrides)"
    return validate(raw, source)


def to_dict(config: RunConfig) -> dict:
    """Plain-data form of a config (tuples as lists), for YAML, JSON and W&B."""
    return config.model_dump(mode="json")


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)
