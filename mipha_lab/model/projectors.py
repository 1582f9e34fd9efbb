"""Projectors: map vision tokens (N, T, D_vision) to language-model embeddings (N, T', D_lm).

Every projector takes `in_dim`, `out_dim`, `grid` (patches per side, or None when the tokens do not
form a square grid) and its own parameters from the experiment, and reports `num_tokens(t)`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mipha_lab.registry import Registry

PROJECTORS: Registry[Any] = Registry("projector", "vision-to-language connectors")


class Projector(nn.Module):
    """Base of the projectors that need one: `num_tokens` says how many tokens come out per image."""

    def num_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens


def gelu_mlp(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """Linear -> (GELU -> Linear) x (depth - 1): the layout LLaVA checkpoints store as `mm_projector.{0,2,...}`."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@PROJECTORS.register("identity")
class IdentityProjector(Projector):
    """No parameters: the vision width must equal the LM width."""

    def __init__(self, in_dim: int, out_dim: int, grid: int | None = None) -> None:
        super().__init__()
        if in_dim != out_dim:
            raise ValueError(f"identity projector needs equal widths, got vision {in_dim} and LM {out_dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@PROJECTORS.register("mlp{depth}x_gelu", "linear layers with GELU between them, any depth (as LLaVA's builder)")
@PROJECTORS.register("mlp")
class MLPProjector(nn.Sequential):
    """Linear layers with GELU between them; `depth` 1 is `linear`, 2 is LLaVA-1.5's `mlp2x_gelu`.

    A plain Sequential, so weights keep the `0.weight`, `2.weight` names LLaVA-family checkpoints use.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: int | None = None, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"mlp projector depth must be at least 1, got {depth}")
        super().__init__(*gelu_mlp(in_dim, out_dim, depth))

    def num_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens


@PROJECTORS.register("linear")
class LinearProjector(MLPProjector):
    """One linear layer (LLaVA-1's projector)."""

    def __init__(self, in_dim: int, out_dim: int, grid: int | None = None) -> None:
        super().__init__(in_dim, out_dim, grid, depth=1)


@PROJECTORS.register("mlp2x_gelu")
class MLP2xGeluProjector(MLPProjector):
    """Linear -> GELU -> Linear (LLaVA-1.5 and Mipha)."""

    def __init__(self, in_dim: int, out_dim: int, grid: int | None = None) -> None:
        super().__init__(in_dim, out_dim, grid, depth=2)


def _require_grid(name: str, grid: int | None) -> int:
    if grid is None:
        raise ValueError(f"projector '{name}' pools a square token grid; use feature selection 'patch'")
    return grid


class _GridPool(nn.Module):
    """(N, g*g, C) -> (N, k*k, C) by 2-D adaptive average pooling."""

    def __init__(self, grid: int, pooled: int) -> None:
        super().__init__()
        self.grid, self.pool = grid, nn.AdaptiveAvgPool2d(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _t, c = x.shape
        x = x.transpose(1, 2).reshape(n, c, self.grid, self.grid)
        return self.pool(x).flatten(2).transpose(1, 2)


@PROJECTORS.register("avgpool")
class AvgPoolProjector(Projector):
    """Average-pool the grid to `tokens_per_side`^2 tokens, then an MLP of `depth` layers."""

    def __init__(self, in_dim: int, out_dim: int, grid: int | None = None, tokens_per_side: int = 12, depth: int = 2):
        super().__init__()
        self.side = tokens_per_side
        self.pool = _GridPool(_require_grid("avgpool", grid), tokens_per_side)
        self.mlp = gelu_mlp(in_dim, out_dim, depth)

    def num_tokens(self, num_input_tokens: int) -> int:
        return self.side**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(x))


@PROJECTORS.register("ldp-v2")
class LDPv2Projector(Projector):
    """MobileVLM V2's lightweight downsample projector: MLP, pool to k x k, depthwise-conv position encoding."""

    def __init__(self, in_dim: int, out_dim: int, grid: int | None = None, tokens_per_side: int = 12):
        super().__init__()
        self.side = tokens_per_side
        self.mlp = gelu_mlp(in_dim, out_dim, 2)
        self.pool = _GridPool(_require_grid("ldp-v2", grid), tokens_per_side)
        self.peg = nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim)

    def num_tokens(self, num_input_tokens: int) -> int:
        return self.side**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.mlp(x))
        n, _t, c = x.shape
        grid = x.transpose(1, 2).reshape(n, c, self.side, self.side)
        return x + self.peg(grid).flatten(2).transpose(1, 2)


def pixel_shuffle(x: torch.Tensor, grid: int, ratio: int) -> torch.Tensor:
    """(N, g*g, C) -> (N, (g/r)^2, r*r*C): each r x r block of the grid becomes one token, its patches'
    features concatenated row by row (Idefics3's order)."""
    n, _t, c = x.shape
    side = grid // ratio
    blocks = x.reshape(n, side, ratio, side, ratio, c).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, side * side, ratio * ratio * c)


@PROJECTORS.register("pixel-shuffle")
class PixelShuffleProjector(Projector):
    """Idefics3 / SmolVLM / nanoVLM's token compression: space-to-depth by `ratio` on the patch grid (tokens
    / ratio^2, each ratio^2 times wider), then an MLP of `depth` layers (1: one linear layer, as Idefics3)."""

    def __init__(self, in_dim: int, out_dim: int, grid: int | None = None, ratio: int = 2, depth: int = 1):
        super().__init__()
        self.grid, self.ratio = _require_grid("pixel-shuffle", grid), ratio
        if ratio < 1 or self.grid % ratio:
            raise ValueError(
                f"projector 'pixel-shuffle': ratio {ratio} does not divide the tower's {self.grid} x {self.grid} "
                "patch grid"
            )
        self.mlp = gelu_mlp(in_dim * ratio * ratio, out_dim, depth)

    def num_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens // (self.ratio * self.ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.grid, self.ratio))


def grid_side(num_tokens: int, square: bool) -> int | None:
    side = math.isqrt(num_tokens)
    return side if square and side * side == num_tokens else None
