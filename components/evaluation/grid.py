"""The source | generated | target picture of a fixed set of held-out samples."""

import math

import torch
from PIL import Image, ImageDraw

from components.evaluation.image_metrics import to_unit_range

_GAP = 2
_HEADER = 14
# small test-size images are enlarged (nearest neighbour, pixels stay visible) to at least
# this many pixels a side, so a person can see them and the column labels fit
_MIN_CELL = 64


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    array = (to_unit_range(image) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if array.shape[2] == 1:
        picture = Image.fromarray(array[:, :, 0], mode="L").convert("RGB")
    else:
        picture = Image.fromarray(array, mode="RGB")
    if scale == 1:
        return picture
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)


def sample_grid(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Image.Image:
    """One row per sample (source, generated, target; C x H x W in [-1, 1]) under a labelled header."""
    if not samples:
        raise ValueError("no samples for the grid")
    height, width = samples[0][0].shape[-2:]
    scale = max(1, math.ceil(_MIN_CELL / min(height, width)))
    height, width = height * scale, width * scale
    grid = Image.new("RGB", (3 * width + 2 * _GAP, _HEADER + len(samples) * (height + _GAP)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(("source", "generated", "target")):
        draw.text((column * (width + _GAP) + 2, 1), label, fill="black")
    for row, images in enumerate(samples):
        for column, image in enumerate(images):
            grid.paste(_to_pil(image, scale), (column * (width + _GAP), _HEADER + row * (height + _GAP)))
    return grid
