"""Pages -> views as DeepSeek's own code makes them, for both families: a global view padded
to a square with PIL (ImageOps.pad: bicubic, centred with round(), mean-grey fill) and, in
gundam mode, tiles of the page resized to the grid closest to its aspect ratio, cut row by row.

Both families compute their pixels here rather than through an image processor whose output
depends on the installed backend: transformers' DeepseekOcr2ImageProcessor resizes with
torchvision when it is installed and with PIL otherwise (different pixels), and centres the
global view with floor(), one pixel away from DeepSeek's and vLLM's views wherever the
padding is odd.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps


def tile_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(tiles across, tiles down) whose aspect ratio is closest to the page's; among equal
    ratios the larger grid wins when the page has the pixels to fill it."""
    grids = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if min_tiles <= i * j <= max_tiles}, key=lambda g: g[0] * g[1])
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


def to_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    """An RGB view -> a normalised [3, H, W] float32 tensor (ToTensor, then Normalize)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def padded_view(image: Image.Image, size: int, mean) -> Image.Image:
    """The page fitted into a size x size square, aspect kept, filled with the mean colour."""
    return ImageOps.pad(image, (size, size), method=Image.BICUBIC, color=tuple(int(m * 255) for m in mean))


def tiles(image: Image.Image, size: int, crop: bool, min_tiles: int, max_tiles: int, mean,
          std) -> tuple[tuple[int, int], torch.Tensor | None]:
    """(grid, [n, 3, size, size] tiles or None): the page resized to the grid closest to its
    aspect ratio and cut left to right, top to bottom. None (grid (1, 1)) when `crop` is off,
    when the page fits within one tile on both sides, or when the closest grid is one tile:
    DeepSeek's code and vLLM add tiles only for a grid of two or more."""
    w, h = image.size
    grid = tile_grid(w, h, size, min_tiles, max_tiles) if crop and (w > size or h > size) else (1, 1)
    if grid == (1, 1):
        return grid, None
    resized = image.resize((size * grid[0], size * grid[1]), Image.BICUBIC)
    cut = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
           for r in range(grid[1]) for c in range(grid[0])]
    return grid, torch.stack([to_tensor(t, mean, std) for t in cut])
