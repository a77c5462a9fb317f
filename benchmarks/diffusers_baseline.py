"""diffusers' `UNet2DModel` laid out exactly as our DDPM U-Net, and the weight map between them.

The speed comparison of `benchmarks/train_step.py` is only fair if both networks compute the
same function with the same parameters. This module builds the diffusers network for one of our
`model:` sections (`diffusers_unet_for`), copies our weights into it (`copy_weights`, which
fails on any key or shape that does not map) and checks that both give the same eps on random
input in fp32 (`check_same_outputs`). Equal outputs after the copy prove equal parameters and
equal FLOPs, not merely similar counts.

What makes the layouts coincide (diffusers' UNet2DModel is itself a port of DDPM's network):
ResnetBlock2D is our ResBlock (GroupNorm, SiLU, conv, timestep projection added after conv1,
dropout before conv2, 1x1 shortcut when the width changes); `resnet_time_scale_shift="default"`
adds the timestep embedding instead of scale-shift; `flip_sin_to_cos=False, freq_shift=0` is
our sines-then-cosines embedding with frequencies 10000^(-i/half); Downsample2D is a stride-2
3x3 conv with padding 1 and Upsample2D nearest x2 then a 3x3 conv, like ours; the up blocks
take their skips in the same order. Attention: our 1x1 conv `qkv` is diffusers' Linear
`to_q`/`to_k`/`to_v` stacked (output channels q, then k, then v, each head-major) and our 1x1
`proj_out` is `to_out.0`. One mismatch cannot be expressed: diffusers has a single
`attention_head_dim` for every level, where our config has a single `num_heads`; networks whose
attention levels have different widths then need `head_channels` (`diffusers_unet_kwargs`
says so).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util

import torch
from torch import nn
from torchvision_compat import import_torchvision

from pipeline import models
from pipeline.models.layers import AttentionBlock
from pipeline.models.unet import Downsample, ResBlock, UNet, Upsample

# Our parameter names inside a residual block and an attention block -> diffusers' names.
_RESBLOCK_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj",
                   "norm2": "norm2", "conv2": "conv2", "shortcut": "conv_shortcut"}
_ATTENTION_NAMES = {"norm": "group_norm", "proj_out": "to_out.0"}
_NORM_EPS = 1e-6  # pipeline/models/layers.py group_norm


def import_diffusers():
    """The diffusers package, with its models importable (diffusers imports torchvision whenever
    it is installed: benchmarks/torchvision_compat.py makes a mismatched one importable)."""
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()
    try:
        import diffusers
    except ImportError:
        raise SystemExit("benchmarks: diffusers is not installed; `pip install diffusers` "
                         "(the comparison was written against 0.42)") from None
    return diffusers


def diffusers_unet_kwargs(model_config, image_size: int, channels: int) -> dict:
    """`UNet2DModel(**kwargs)` arguments reproducing our UNet for a diffusion `model:` section."""
    resolutions = [image_size // 2 ** level for level in range(len(model_config.channel_mult))]
    widths = [model_config.base_channels * mult for mult in model_config.channel_mult]
    attends = [resolution in model_config.attention_resolutions for resolution in resolutions]
    if model_config.head_channels is not None:
        head_dim = model_config.head_channels
    else:
        attention_widths = sorted({w for w, a in zip(widths, attends) if a} | {widths[-1]})
        head_dims = {width // model_config.num_heads for width in attention_widths}
        if len(head_dims) != 1:
            raise ValueError(
                f"diffusers' UNet2DModel has one attention_head_dim for all levels, but "
                f"num_heads={model_config.num_heads} gives head widths {sorted(head_dims)} at "
                f"attention widths {attention_widths}; set model.head_channels instead")
        head_dim = head_dims.pop()
    return {
        "sample_size": image_size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": tuple(widths),
        "layers_per_block": model_config.num_res_blocks,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        "mid_block_type": "UNetMidBlock2D",
        "add_attention": True,
        "attention_head_dim": head_dim,
        "norm_num_groups": model_config.norm_groups,
        "norm_eps": _NORM_EPS,
        "dropout": model_config.dropout,
        "act_fn": "silu",
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 0,
        "resnet_time_scale_shift": "default",
        "downsample_type": "conv",
        "downsample_padding": 1,
        "upsample_type": "conv",
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
    }


def diffusers_unet_for(model_config, image_size: int, channels: int):
    """A diffusers UNet2DModel with the layout of our UNet for this `model:` section."""
    diffusers = import_diffusers()
    return diffusers.UNet2DModel(**diffusers_unet_kwargs(model_config, image_size, channels))


def _module_pairs(ours: UNet) -> dict[str, str]:
    """Our module path -> the diffusers module path holding the same weights."""
    pairs = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "conv_in": "conv_in",
        "mid_res1": "mid_block.resnets.0",
        "mid_attn": "mid_block.attentions.0",
        "mid_res2": "mid_block.resnets.1",
        "norm_out": "conv_norm_out",
        "conv_out": "conv_out",
    }
    # Our down/up paths are flat lists in which a Downsample/Upsample closes a level; diffusers
    # nests them as blocks[level].resnets[i] / .attentions[i] / .downsamplers.0 / .upsamplers.0.
    for path, blocks, resampler in (("down", ours.down, "downsamplers"),
                                    ("up", ours.up, "upsamplers")):
        level, index = 0, 0
        for position, block in enumerate(blocks):
            if isinstance(block, (Downsample, Upsample)):
                pairs[f"{path}.{position}.conv"] = f"{path}_blocks.{level}.{resampler}.0.conv"
                level, index = level + 1, 0
                continue
            pairs[f"{path}.{position}.0"] = f"{path}_blocks.{level}.resnets.{index}"
            if isinstance(block[1], AttentionBlock):
                pairs[f"{path}.{position}.1"] = f"{path}_blocks.{level}.attentions.{index}"
            index += 1
    return pairs


def translated_state_dict(ours: UNet) -> dict[str, torch.Tensor]:
    """Our UNet's state_dict under diffusers' names and shapes (qkv split, 1x1 convs as Linear)."""
    pairs = _module_pairs(ours)
    translated: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in ours.state_dict().items():
        module_path, _, param = key.rpartition(".")
        block_path = next((p for p in pairs if module_path == p or module_path.startswith(p + ".")),
                          None)
        if block_path is None:
            unmapped.append(key)
            continue
        inner = module_path[len(block_path) + 1:]
        target = pairs[block_path]
        block = ours.get_submodule(block_path)
        if isinstance(block, ResBlock):
            translated[f"{target}.{_RESBLOCK_NAMES[inner]}.{param}"] = tensor
        elif isinstance(block, AttentionBlock) and inner == "qkv":
            # Output channels are [q | k | v], each ordered (head, channel within head) exactly as
            # diffusers' to_q/to_k/to_v outputs are viewed as (heads, head_dim).
            for name, part in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                translated[f"{target}.{name}.{param}"] = part.flatten(1) if param == "weight" else part
        elif isinstance(block, AttentionBlock):
            translated[f"{target}.{_ATTENTION_NAMES[inner]}.{param}"] = (
                tensor.flatten(1) if inner == "proj_out" and param == "weight" else tensor)
        else:
            translated[f"{target}.{param}"] = tensor
    if unmapped:
        raise ValueError(f"copy_weights: our parameters {unmapped} have no diffusers counterpart")
    return translated


def copy_weights(ours: UNet, theirs: nn.Module) -> None:
    """Load our UNet's weights into a diffusers UNet2DModel; every key and shape must match."""
    translated = translated_state_dict(ours)
    expected = theirs.state_dict()
    problems = [f"diffusers {key} is not set by ours" for key in sorted(set(expected) - set(translated))]
    problems += [f"{key} is not a diffusers parameter" for key in sorted(set(translated) - set(expected))]
    problems += [f"{key}: ours {tuple(value.shape)}, diffusers {tuple(expected[key].shape)}"
                 for key, value in translated.items()
                 if key in expected and value.shape != expected[key].shape]
    if problems:
        raise ValueError(f"copy_weights: the networks differ: {'; '.join(problems)}")
    theirs.load_state_dict(translated, strict=True)


@torch.no_grad()
def randomize_weights_(network: nn.Module, seed: int) -> None:
    """Nonzero random weights everywhere. Our initialisation zeroes the last layer of every
    residual branch and conv_out, so the network outputs 0 and an equality check on it would
    prove nothing; PyTorch's default conv/linear initialisation and random GroupNorm affines
    open every branch while keeping activations of order one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in network.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.reset_parameters()
            elif isinstance(module, nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)


@contextlib.contextmanager
def no_tf32():
    """True fp32 on CUDA: no TF32 in convolutions (on by default) or matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def output_difference(ours: UNet, theirs: nn.Module, image_size: int, channels: int,
                      batch: int = 2, seed: int = 0) -> tuple[float, float]:
    """(max |ours - theirs|, max |ours|) of eps on one random fp32 batch and random timesteps,
    both networks in eval mode (no dropout), without TF32."""
    device = next(ours.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, image_size, image_size, generator=generator).to(device)
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    was_training = ours.training, theirs.training
    try:
        ours.eval()
        theirs.eval()
        with torch.no_grad(), no_tf32():
            eps_ours = ours(x, t).float()
            eps_theirs = theirs(x, t).sample.float()
    finally:
        ours.train(was_training[0])
        theirs.train(was_training[1])
    return (eps_ours - eps_theirs).abs().max().item(), eps_ours.abs().max().item()


RELATIVE_TOLERANCE = 1e-4
"""Largest allowed max |ours - theirs| / max |ours| in fp32. The timestep embeddings are
bit-identical; the networks differ only in summation order (attention projections as 1x1
convolutions vs Linear), about 1e-6 relative on CPU. A mislaid weight gives differences of
order one."""


def check_same_outputs(model_config, image_size: int, channels: int, batch: int = 2,
                       device: str | torch.device = "cpu", seed: int = 0) -> tuple[float, float]:
    """Build both networks, randomize ours, copy it into diffusers' and compare eps in fp32.
    Returns (max abs difference, max abs output); raises if their ratio exceeds the tolerance."""
    ours = models.build(model_config, image_size, channels).net
    randomize_weights_(ours, seed)
    theirs = diffusers_unet_for(model_config, image_size, channels)
    copy_weights(ours, theirs)
    ours.to(device)
    theirs.to(device)
    difference, scale = output_difference(ours, theirs, image_size, channels, batch, seed)
    if difference > RELATIVE_TOLERANCE * scale:
        raise AssertionError(f"diffusers' network differs from ours: max |eps difference| "
                             f"{difference:.3g} for outputs up to {scale:.3g} (tolerance "
                             f"{RELATIVE_TOLERANCE:g} relative)")
    return difference, scale
