"""A fused vision encoder: several towers see the same image, each through its own preprocessing, and their
patch features are concatenated channel-wise (Prismatic's `dinosiglip`: DINOv2-L/14 1024 + SigLIP-SO400M/14
1152 = 2176 channels on a 27 x 27 grid at 384 px).

The image arrives as the towers' preprocessed images stacked on the channel axis (3 channels per tower,
`image_processing.StackedProcessor`), so batches, splicing and tiling are those of one tower.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from mipha_lab.errors import ConfigError
from mipha_lab.model.vision import VisionTower


class FusedVisionTower(VisionTower):
    """Named sub-towers (`towers.<name>`, each a VisionTower with its own card) run on their channels of the
    input; features are concatenated in the card's order. `grid`: `equal` (the towers' grids must match)
    or `pool` (adaptive average pooling to the smallest grid)."""

    def __init__(self, towers: dict[str, VisionTower], grid: str = "equal", name: str = "") -> None:
        if len(towers) < 2:
            raise ConfigError(f"fused vision encoder '{name}' needs at least two towers, got {list(towers)}")
        sizes = {key: tower.image_size for key, tower in towers.items()}
        if len(set(sizes.values())) > 1:
            raise ConfigError(
                f"fused vision encoder '{name}': every tower must take the same input side, got {sizes} "
                "(set `image_size` of a tower in the card)"
            )
        grids = {key: tower.grid for key, tower in towers.items()}
        if grid == "equal" and len(set(grids.values())) > 1:
            raise ConfigError(
                f"fused vision encoder '{name}': the towers' patch grids differ ({grids} patches per side); "
                "give the towers input sides with equal grids, or set `grid: pool` in the card"
            )
        for key, tower in towers.items():
            if not tower.is_square_grid:
                raise ConfigError(f"fused vision encoder '{name}': tower '{key}' keeps its CLS token (select: patch)")
        side = min(grids.values())
        image_size = next(iter(sizes.values()))
        super().__init__(
            hidden_size=sum(tower.hidden_size for tower in towers.values()),
            image_size=image_size,
            patch_size=image_size // side,
            num_prefix_tokens=0,
            image_spec=next(iter(towers.values())).image_spec,
            name=name,
        )
        self.towers = nn.ModuleDict(towers)
        self.side = side
        self.in_channels = 3 * len(towers)

    @property
    def grid(self) -> int:
        return self.side

    @property
    def image_specs(self) -> tuple:
        return tuple(tower.image_spec for tower in self.towers.values())

    @property
    def parts(self) -> list[VisionTower]:
        return [cast(VisionTower, tower) for tower in self.towers.values()]

    @property
    def blocks(self) -> nn.ModuleList:
        """Every tower's blocks, in the card's order (a new list each time: the modules stay registered
        under their own tower only)."""
        return nn.ModuleList([block for tower in self.parts for block in tower.blocks])

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = []
        for index, tower in enumerate(self.parts):
            own = tower(pixel_values[:, 3 * index : 3 * index + 3])
            features.append(self._to_grid(own))
        return torch.cat(features, dim=-1)

    def _to_grid(self, features: torch.Tensor) -> torch.Tensor:
        """(N, g*g, C) -> (N, side*side, C), average-pooled when the tower's grid is finer."""
        grid = math.isqrt(features.shape[1])
        if grid == self.side:
            return features
        square = features.transpose(1, 2).reshape(features.shape[0], -1, grid, grid)
        return F.adaptive_avg_pool2d(square, self.side).flatten(2).transpose(1, 2)
