"""Where a frozen model's weights live: offloaded to CPU memory between forwards, or placed by a
``device_map``; either way the training loop must not move it.

``offload_to_cpu`` uses Accelerate's ``cpu_offload``: the weights stay in CPU memory (the module itself
holds only ``meta`` tensors), and each submodule's weights are copied to the execution device just
for its forward, then dropped. Peak device memory for the teacher is one layer instead of the whole
model, at the price of one host-to-device copy of every weight per forward.
"""

from __future__ import annotations

import torch
from torch import nn


def is_placed(module: nn.Module) -> bool:
    """Whether something other than the loop decides where ``module``'s weights are (Accelerate's
    offload hooks, or transformers' ``device_map``): then ``module.to(device)`` must not be called."""
    return hasattr(module, "_hf_hook") or bool(getattr(module, "hf_device_map", None))


def offload_to_cpu(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Keep ``module``'s weights in CPU memory and run each layer on ``device`` (in place; idempotent).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x = torch.ones(1, 3)
        >>> expected = net(x)
        >>> _ = offload_to_cpu(net, "cpu")
        >>> next(net.parameters()).device.type, torch.allclose(net(x), expected)
        ('meta', True)
    """
    if hasattr(module, "_hf_hook"):
        return module
    from accelerate import cpu_offload

    return cpu_offload(module, execution_device=torch.device(device))
