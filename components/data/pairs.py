"""Turning a source pair's raw bytes into the two JPEGs a shard stores, or a reason why not."""

import io
import warnings

from PIL import Image

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


def _encode(image: Image.Image, size: int, quality: int) -> bytes:
    buffer = io.BytesIO()
    # 4:4:4 chroma: label maps and edge maps have sharp colour edges that 4:2:0 would smear.
    image.resize((size, size), Image.BICUBIC).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def encode_pair(pair: SourcePair, blobs: tuple[bytes, ...], layout: Layout, direction: str,
                size: int, quality: int) -> tuple[bytes, bytes] | list[BadInput]:
    """(source JPEG, target JPEG) at size x size, or every problem with this pair."""
    images = [_decode(blob, pair.split, path) for blob, path in zip(blobs, pair.origin)]
    problems = [image for image in images if isinstance(image, BadInput)]
    if problems:
        return problems
    if layout == "side_by_side":
        (both,) = images
        width, height = both.size
        if width % 2:
            return [BadInput(pair.split, pair.origin[0], f"width {width} is odd: cannot split it into two equal halves")]
        left = both.crop((0, 0, width // 2, height))
        right = both.crop((width // 2, 0, width, height))
        source, target = (left, right) if direction == "AtoB" else (right, left)
    else:
        source, target = images
        if source.size != target.size:
            return [BadInput(pair.split, pair.origin[0],
                             f"size {source.size[0]}x{source.size[1]} differs from its partner "
                             f"{pair.origin[1]} ({target.size[0]}x{target.size[1]})")]
    return _encode(source, size, quality), _encode(target, size, quality)
