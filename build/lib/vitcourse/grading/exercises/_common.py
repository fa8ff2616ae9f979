"""Helpers the chapter specs share: random inputs, randomised reference modules, their weights."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..runtime import arr


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """A float32 array of normal samples, shape ``shape``."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def t(x: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing nothing with ``x``."""
    return torch.from_numpy(np.array(x))


def randomised(module: nn.Module, rng: np.random.Generator, scale: float = 0.3) -> nn.Module:
    """Give every parameter of ``module`` random normal values (std ``scale``); eval mode.

    Random weights (not the small default init) make wrong wiring visible in the outputs.
    """
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(t(randn(rng, *p.shape, scale=scale)))
    return module.eval()


def weights(module: nn.Module) -> dict:
    """The module's ``state_dict`` as task arrays (what the student's module must load)."""
    return {k: arr(v) for k, v in module.state_dict().items()}


def shapes(module: nn.Module) -> dict:
    """``{name: shape}`` of a module's ``state_dict``."""
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@torch.no_grad()
def run(module: nn.Module, *inputs: np.ndarray) -> np.ndarray:
    """The module's output for NumPy inputs, as NumPy."""
    return module(*(t(x) for x in inputs)).numpy()
