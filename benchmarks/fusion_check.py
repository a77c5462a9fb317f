"""Which kernels Inductor generates for one U-Net residual block, forward and backward.

``train.compile`` counts on Inductor to fuse each GroupNorm with the SiLU after it (and the
timestep add, and the residual add) instead of running them as separate memory-bound kernels.
This compiles one ``ResBlock`` of pipeline/models/unet.py (``--channels``, 16×16, 32 groups)
through ``torch.compile(fullgraph=True)``, checks its output and input gradient against eager, and
prints the names of the generated kernels (``cpp_fused_*`` on CPU, ``triton_*`` on GPUs; Inductor
names a kernel after the operations fused into it). Convolutions and matmuls are library calls
and are not listed.

    OMP_NUM_THREADS=1 python benchmarks/fusion_check.py            # CPU: about 10-60 s of compiling
    python benchmarks/fusion_check.py --channels 256               # on a GPU
"""

from __future__ import annotations

import argparse
import re
import sys

import torch
from torch._inductor.utils import run_and_get_code

from pipeline.models.unet import ResBlock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    if args.channels < 32 or args.channels % 32:
        parser.error(f"--channels {args.channels}: must be a positive multiple of 32 (the GroupNorm groups)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Full fp32 on both sides: cuDNN convolutions default to TF32 on a GPU (about 3e-4 relative
    # error, seen on the H200 against eager), which would hide nothing but fail the comparison.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    block = ResBlock(args.channels, args.channels, 4 * args.channels, 0.0, 32).to(device)
    for conv in (block.conv1, block.conv2):
        torch.nn.init.normal_(conv.weight, std=0.02)
    x = torch.randn(args.batch, args.channels, 16, 16, device=device, requires_grad=True)
    temb = torch.randn(args.batch, 4 * args.channels, device=device)
    compiled = torch.compile(block, fullgraph=True)

    def step(module):
        x.grad = None
        out = module(x, temb)
        out.square().mean().backward()
        return out.detach(), x.grad.detach()

    (out, grad), sources = run_and_get_code(step, compiled)
    expected_out, expected_grad = step(block)
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-5)
    names = sorted({name for source in sources for name in re.findall(r"\b((?:cpp|triton)_\w+?)(?:\b|\.)", source)
                    if "fused" in name or name.startswith("triton_")})
    print(f"device {device}, ResBlock({args.channels}) at 16x16: output and input gradient match eager")
    for name in names:
        print(name)
    fused = [n for n in names if "group_norm" in n and "silu" in n]
    print(f"{len(fused)} of {len(names)} generated kernels hold a GroupNorm fused with a SiLU")
    return 0 if fused else 1


if __name__ == "__main__":
    sys.exit(main())
