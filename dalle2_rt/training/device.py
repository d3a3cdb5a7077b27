"""Where training runs: the CPU (the default, and every test) or a CUDA GPU when one is lent.

The data path (the shapes-world renderer, tokenizer, noise draws from the stage's CPU generator) stays on the
CPU whatever the device, so a run draws the same batches and noise on either; only the networks move. The
boundary is the network call: ``OnDevice`` moves the tensors going in to the device and the outputs back, and
autograd carries the gradients across. The transfers are small next to the U-Net's work (a 32×32 batch of 32
is 0.4 MB).
"""
from __future__ import annotations

import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    """"cpu", "cuda" (an error without a GPU) or "auto" (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = \"cuda\" but torch sees no CUDA GPU (use \"auto\" to fall back to the CPU)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def _move(x, device):
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, tuple | list):
        return type(x)(_move(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


class OnDevice(nn.Module):
    """``module`` on ``device``, called with and returning CPU tensors."""

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__()
        self.module, self.device = module, device

    def forward(self, *args, **kwargs):
        return _move(self.module(*_move(args, self.device), **_move(kwargs, self.device)), torch.device("cpu"))
