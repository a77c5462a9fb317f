"""Fast pixel-by-pixel sampling for the autoregressive family: each network pass recomputes only
the rows that changed since the pass before (fast generation in the spirit of Ramachandran et al.
2017, "Fast Generation for Convolutional Autoregressive Models", with whole rows as the unit).

Both networks of `autoregressive` are row-causal: an activation at row r (of its resolution)
depends on the image's rows ≤ r only (at a level 2^l times coarser: on the full-resolution rows
≤ 2^l·r + 2^l − 1 at most, and in fact ≤ 2^l·r, since stride-2 shifted convolutions read rows
2r − 1 and 2r). Sampling pixel (i, j) changes the image in row i alone, so the next pass needs
new values only in row i of every full-resolution activation and in row i >> l of every
activation at level l: a strip of one row, with the rows above read from a cache of every
activation that a convolution reads with rows above it (a kernel taller than one row, a
stride-2 convolution). At the first pixel of a row, the row above is recomputed too (its last
pixel was drawn after its last pass). Everything else — 1×1 convolutions, one-row kernels,
transposed upsampling (output row r reads input row r // 2 only), activations, class biases,
shifts — runs on the strip itself.

Every strip operation computes exactly what the full pass computes at those rows, so the
sampler draws from the same conditionals with the same noise: the same seed gives the same
images (`tests/test_autoregressive_rows.py` compares it with `PixelCNNModel`'s full-pass
reference, in float64 so that summation order cannot move a draw across a rounding boundary).
One pass costs one or two rows instead of H: about H/1.1 times fewer operations per pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.autoregressive import (
    MaskedPixelCNNNetwork,
    PixelCNNPlusPlusNetwork,
    _add_class_bias,
    concat_elu,
    gate,
    right_shift,
)
from pipeline.models.base import to_unit_interval


def shifted_conv_rows(conv: nn.Conv2d, full: Tensor, first: int, last: int) -> Tensor:
    """Rows first..last of a top-padded convolution (`DownShiftedConv2d`,
    `DownRightShiftedConv2d`, any stride) of the whole input ``full``: output row r reads input
    rows r·s − (kh − 1) .. r·s, zeros above the image."""
    kernel_height, stride = conv.kernel_size[0], conv.stride[0]
    top = first * stride - (kernel_height - 1)
    rows = full[:, :, max(top, 0) : last * stride + 1]
    left, right, _, _ = conv.pad
    rows = F.pad(rows, (left, right, max(-top, 0), 0))
    return F.conv2d(rows, conv.weight, conv.bias, stride=conv.stride)


def rows_above(compute, first: int, last: int) -> Tensor:
    """Rows first..last of ``down_shift(A)``, i.e. rows first − 1 .. last − 1 of A, where
    ``compute(a, b)`` gives A's rows a..b (a zero row above the image)."""
    rows = compute(max(first - 1, 0), max(last - 1, 0))
    if first == 0:
        rows = torch.cat([torch.zeros_like(rows[:, :, :1]), rows[:, :, : last - first]], dim=2)
    return rows


def upsampled_rows(up: nn.Module, coarse: Tensor, coarse_first: int, first: int, last: int) -> Tensor:
    """Rows first..last of a stride-2 transposed convolution with a kernel two rows tall, from
    the coarse strip whose first row is ``coarse_first``: output row r reads input row r // 2."""
    fine = up(coarse)  # rows 2·coarse_first ..
    offset = first - 2 * coarse_first
    return fine[:, :, offset : offset + last - first + 1]


class RowCache:
    """Whole activations [B, C, H_level, W_level], allocated at first use and written a strip at
    a time; rows below the current ones hold stale values that nothing reads."""

    def __init__(self):
        self.tensors: dict[tuple[int, str], Tensor] = {}

    def put(self, key: tuple[int, str], strip: Tensor, first: int, height: int) -> Tensor:
        """Write ``strip`` at rows first.. of the activation ``key`` (``height`` rows in all) and
        return the whole activation."""
        full = self.tensors.get(key)
        if full is None:
            full = strip.new_zeros(strip.shape[0], strip.shape[1], height, strip.shape[3])
            self.tensors[key] = full
        full[:, :, first : first + strip.shape[2]] = strip
        return full


class CachedRows:
    """``outputs(x, i, j)``: the network's output at pixel (i, j) [B, out, 1, 1] for the image
    ``x`` (uint8 [B, C, H, W]), as ``network(to_unit_interval(x), labels)[:, :, i:i+1, j:j+1]``,
    when calls come in raster order (i, j) and ``x`` changes only at the pixel of the call before
    (repeated calls at one pixel, as per-subpixel sampling makes, are allowed)."""

    def __init__(self, network: nn.Module, height: int, labels: Tensor | None = None):
        if not isinstance(network, (PixelCNNPlusPlusNetwork, MaskedPixelCNNNetwork)):
            raise TypeError(f"no cached sampling for {type(network).__name__}")
        self.network = network
        self.height = height
        self.labels = labels
        self.dtype = next(network.parameters()).dtype
        self.cache = RowCache()
        self.last_row = -1

    def outputs(self, x: Tensor, i: int, j: int) -> Tensor:
        # The rows written since the last pass: row i, and row i − 1 when a new row starts.
        first = i - 1 if i > self.last_row and i > 0 else i
        self.last_row = i
        # As the network's input (float32); a float64 copy of the network (the tests) gets float64.
        image = to_unit_interval(x).to(self.dtype)
        if isinstance(self.network, PixelCNNPlusPlusNetwork):
            out = self._pixelcnn_pp(image, first, i)
        else:
            out = self._masked(image, first, i)
        return out[:, :, -1:, j : j + 1]

    # -- PixelCNN++ (mirrors PixelCNNPlusPlusNetwork.forward and GatedResnet.forward) ---------

    def _resnet(self, block: nn.Module, x: Tensor, first: int, last: int, height: int,
                aux: Tensor | None = None) -> Tensor:
        whole_in = self.cache.put((id(block), "in"), concat_elu(x), first, height)
        h = shifted_conv_rows(block.conv_in, whole_in, first, last)
        if block.aux is not None:
            h = h + block.aux(concat_elu(aux))
        whole_h = self.cache.put((id(block), "h"), block.dropout(concat_elu(h)), first, height)
        h = _add_class_bias(shifted_conv_rows(block.conv_out, whole_h, first, last), block.class_bias,
                            self.labels)
        a, b = h.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)

    def _pixelcnn_pp(self, image: Tensor, first: int, last: int) -> Tensor:
        net = self.network
        x = torch.cat([image, torch.ones_like(image[:, :1])], dim=1)
        u = rows_above(lambda a, b: shifted_conv_rows(net.u_init, x, a, b), first, last)
        ul = rows_above(lambda a, b: shifted_conv_rows(net.ul_init_above, x, a, b), first, last) + right_shift(
            shifted_conv_rows(net.ul_init_left, x, first, last)
        )
        u_skips, ul_skips = [u], [ul]
        for level, stage in enumerate(net.down_stages):
            a, b, height = first >> level, last >> level, self.height >> level
            for u_block, ul_block in stage:
                u = self._resnet(u_block, u, a, b, height)
                ul = self._resnet(ul_block, ul, a, b, height, u)
                u_skips.append(u)
                ul_skips.append(ul)
            if level < len(net.downsample):
                u_down, ul_down = net.downsample[level]
                a_next, b_next = first >> (level + 1), last >> (level + 1)
                u = shifted_conv_rows(u_down, self.cache.put((id(u_down), "in"), u, a, height), a_next, b_next)
                ul = shifted_conv_rows(ul_down, self.cache.put((id(ul_down), "in"), ul, a, height), a_next, b_next)
                u_skips.append(u)
                ul_skips.append(ul)
        u, ul = u_skips.pop(), ul_skips.pop()
        levels = len(net.up_stages)
        for index, stage in enumerate(net.up_stages):
            level = levels - 1 - index
            a, b, height = first >> level, last >> level, self.height >> level
            for u_block, ul_block in stage:
                u = self._resnet(u_block, u, a, b, height, u_skips.pop())
                ul = self._resnet(ul_block, ul, a, b, height, torch.cat([u, ul_skips.pop()], dim=1))
            if index < len(net.upsample):
                u_up, ul_up = net.upsample[index]
                a_fine, b_fine = first >> (level - 1), last >> (level - 1)
                u = upsampled_rows(u_up, u, a, a_fine, b_fine)
                ul = upsampled_rows(ul_up, ul, a, a_fine, b_fine)
        assert not u_skips and not ul_skips, "every downsampling activation is used once"
        return net.out(F.elu(ul))

    # -- masked gated PixelCNN (mirrors MaskedPixelCNNNetwork.forward, GatedMaskedLayer.forward)

    def _masked(self, image: Tensor, first: int, last: int) -> Tensor:
        strip = image[:, :, first : last + 1]
        v, h = strip, strip
        for layer in self.network.layers:
            whole_v = self.cache.put((id(layer), "v"), v, first, self.height)
            pre = shifted_conv_rows(layer.vertical, whole_v, max(first - 1, 0), last)
            count = last - first + 1
            v_pre = pre[:, :, pre.shape[2] - count :]
            above = pre[:, :, :count] if first > 0 else torch.cat(
                [torch.zeros_like(pre[:, :, :1]), pre[:, :, : count - 1]], dim=2)
            h_pre = layer.horizontal(h) + layer.vertical_to_horizontal(above)
            v_pre = _add_class_bias(v_pre, layer.vertical_class_bias, self.labels)
            h_pre = _add_class_bias(h_pre, layer.horizontal_class_bias, self.labels)
            h_new = layer.horizontal_out(layer.dropout(gate(h_pre)))
            v, h = gate(v_pre), h_new if layer.first else h + h_new
        return self.network.head(h)
