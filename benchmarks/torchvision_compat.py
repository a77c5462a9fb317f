"""Importing the torchvision that pip installs beside a CPU-only torch.

PyPI's Linux wheels of torchvision are CUDA builds. Beside a CPU-only torch their C extension
cannot load, and ``import torchvision`` then fails registering fake kernels for the ``nms`` and
``qnms`` operators the extension would have defined (pytorch/vision#9085). Nothing the benchmarks
use (ImageFolder, the transforms; diffusers, which imports torchvision whenever it is installed)
calls them, so the two operators are declared without kernels and the import is tried again.
With a matching torchvision (any GPU machine's) the first import simply works.
"""

from __future__ import annotations

import sys

import torch

from pipeline.errors import UserError

# torch.library operators declared by import_torchvision; kept alive while the process runs.
_missing_torchvision_ops = None


def import_torchvision():
    """The torchvision module, or a UserError saying how to get one."""
    global _missing_torchvision_ops
    try:
        import torchvision
    except ModuleNotFoundError:
        raise UserError(
            "torchvision is not installed: `pip install --no-deps torchvision==<the release built "
            "for your torch>` (0.28.0 for torch 2.13), or pass --impl ours"
        ) from None
    except RuntimeError as exc:
        if "operator torchvision::" not in str(exc):
            raise
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        _missing_torchvision_ops = torch.library.Library("torchvision", "FRAGMENT")
        for name in ("nms", "qnms"):
            _missing_torchvision_ops.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision
