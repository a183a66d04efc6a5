"""``Conv2d`` module over ``aiter_dist.conv2d``."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.conv import conv2d


class Conv2d(nn.Conv2d):
    """A drop-in ``torch.nn.Conv2d`` whose forward is :func:`aiter_dist.conv2d` (forward, data
    gradient and weight gradient in Triton).

    Same constructor (``in_channels, out_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, bias=True, padding_mode='zeros', device=None, dtype=None``), same
    parameters, initialization and ``state_dict`` (``weight`` (C_out, C_in/groups, KH, KW),
    ``bias`` (C_out,)), so checkpoints load either way. ``padding`` may be an int, a pair,
    ``'valid'`` or ``'same'``. Only ``padding_mode='zeros'`` is supported: the kernels pad with
    zeros as they gather; for the other modes pad the input with ``F.pad`` first. Inputs are
    (N, C_in, H, W) in the weight's dtype, or any float dtype under ``torch.autocast``
    (input, weight and bias are then cast to autocast's dtype, as ``nn.Conv2d`` does there);
    channels_last input (``model.to(memory_format=torch.channels_last)``) is the fast layout and
    gives channels_last output.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(f"aiter_dist.nn.Conv2d: padding_mode={self.padding_mode!r} is not "
                             f"supported, only 'zeros'; pad the input with F.pad(x, ..., "
                             f"mode={self.padding_mode!r}) and use padding=0 instead")

    def forward(self, input):
        weight, bias = self.weight, self.bias
        dev = input.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            input, weight = input.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
