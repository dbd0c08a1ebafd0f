"""Turning a source pair's raw bytes into the two JPEGs a shard stores, or a reason why not."""

import io
import math
import warnings

from PIL import Image

from components.config.data import JpegChromaParams
from components.data.sources import BadInput, Layout, SourcePair

# Modes converted to RGB without losing information a pair could carry. Anything else
# (alpha, CMYK, 16-bit or float) is refused rather than silently altered.
ACCEPTED_MODES = {"RGB", "L", "P"}


def _decode(blob: bytes, split: str, path: str) -> Image.Image | BadInput:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(blob))
            image.load()  # decode now: a truncated file fails here, not in a shard
    except Image.UnidentifiedImageError:
        return BadInput(split, path, "not a readable image (unknown or corrupt format)")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return BadInput(split, path, f"not a readable image ({type(error).__name__}: {error})")
    if image.mode == "P" and "transparency" in image.info:
        return BadInput(split, path, "palette image with transparency; save it as RGB")
    if image.mode not in ACCEPTED_MODES:
        return BadInput(split, path, f"image mode {image.mode} not supported (expected RGB, L or P; convert it to RGB)")
    return image.convert("RGB")


def _encode(image: Image.Image, size: int, quality: int, chroma: str) -> bytes:
    buffer = io.BytesIO()
    image.resize((size, size), Image.BICUBIC).save(buffer, format="JPEG", quality=quality, subsampling=chroma)
    return buffer.getvalue()


def _shape_problem(width: int, height: int, size: int, max_upscale: float, max_aspect_ratio: float,
                   what: str) -> str | None:
    """Why a half of width x height should not become a size x size image, or None."""
    shorter, longer = min(width, height), max(width, height)
    if shorter * max_upscale < size:
        return (f"{what} is too small for image_size {size}: it would be enlarged "
                f"{size / shorter:.1f}x (max_upscale {max_upscale:g}; at least {math.ceil(size / max_upscale)} px "
                "per side needed)")
    if longer / shorter > max_aspect_ratio:
        return (f"{what} has aspect ratio {longer / shorter:.2f}: resizing it to {size}x{size} "
                f"would stretch it (max_aspect_ratio {max_aspect_ratio:g}); crop it closer to a square")
    return None


def encode_pair(pair: SourcePair, blobs: tuple[bytes, ...], layout: Layout, direction: str,
                size: int, quality: int, chroma: JpegChromaParams, max_upscale: float,
                max_aspect_ratio: float) -> tuple[bytes, bytes] | list[BadInput]:
    """(source JPEG, target JPEG) at size x size, each side at its chroma subsampling, or every
    problem with this pair.

    Refused: a half that would be enlarged more than `max_upscale` times (a 2x1 image is two
    1x1 halves), or whose aspect ratio exceeds `max_aspect_ratio` (it would be stretched).
    """
    images = [_decode(blob, pair.split, path) for blob, path in zip(blobs, pair.origin)]
    problems = [image for image in images if isinstance(image, BadInput)]
    if problems:
        return problems
    if layout == "side_by_side":
        (both,) = images
        width, height = both.size
        if width % 2:
            return [BadInput(pair.split, pair.origin[0], f"width {width} is odd: cannot split it into two equal halves")]
        problem = _shape_problem(width // 2, height, size, max_upscale, max_aspect_ratio,
                                 f"each half ({width // 2}x{height} of a {width}x{height} image)")
        if problem:
            return [BadInput(pair.split, pair.origin[0], problem)]
        left = both.crop((0, 0, width // 2, height))
        right = both.crop((width // 2, 0, width, height))
        source, target = (left, right) if direction == "AtoB" else (right, left)
    else:
        source, target = images
        if source.size != target.size:
            return [BadInput(pair.split, pair.origin[0],
                             f"size {source.size[0]}x{source.size[1]} differs from its partner "
                             f"{pair.origin[1]} ({target.size[0]}x{target.size[1]})")]
        problem = _shape_problem(*source.size, size, max_upscale, max_aspect_ratio,
                                 f"each image ({source.size[0]}x{source.size[1]})")
        if problem:
            return [BadInput(pair.split, pair.origin[0], f"{problem} (the same for its partner {pair.origin[1]})")]
    return _encode(source, size, quality, chroma.source), _encode(target, size, quality, chroma.target)
