"""What each `jpeg_chroma` setting keeps of a pix2pix-layout set: PSNR of the stored halves
against the source files' pixels, per side, and the shards' size per pair.

    python bench/chroma_fidelity.py --data DIR                 # e.g. the facades set, prepared labels -> photo
    python bench/chroma_fidelity.py --data DIR --chroma 4:4:4 4:2:2 4:2:0

Each setting prepares DIR with the project's writer, both sides at that subsampling, at
`--image-size` (the halves resized as prepare resizes them), then decodes every stored JPEG
with Pillow and compares it with its source half decoded and resized the same way. Run by
hand; results go to docs/data.md and docs/benchmarks.md with the machine and the command.
"""

import argparse
import io
import json
import math
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import workloads
from PIL import Image

from components.data.manifest import load_manifest


def source_halves(path: Path, size: int) -> dict[str, np.ndarray]:
    """The source file's halves as prepare stores them with direction BtoA (photo | labels files
    like the facades set's: the right half, the labels, is the source), resized to size x size,
    as float pixels."""
    both = Image.open(path).convert("RGB")
    width, height = both.size
    left, right = both.crop((0, 0, width // 2, height)), both.crop((width // 2, 0, width, height))
    return {side: np.asarray(half.resize((size, size), Image.BICUBIC), dtype=np.float64)
            for side, half in (("src", right), ("tgt", left))}


def psnr(mean_squared_error: float) -> float:
    return 10 * math.log10(255**2 / mean_squared_error) if mean_squared_error > 0 else math.inf


def fidelity(prepared: Path, source_root: Path, size: int) -> dict:
    """Per side: PSNR over all pairs (from the mean squared error) and of the worst pair."""
    errors: dict[str, list[float]] = {"src": [], "tgt": []}
    train = load_manifest(prepared).split("train")
    for shard in train.shards:
        with tarfile.open(prepared / shard.tar) as tar:
            members = {member.name: tar.extractfile(member).read() for member in tar if member.isfile()}
        for name, data in members.items():
            if not name.endswith(".json"):
                continue
            key = name.removesuffix(".json")
            reference = source_halves(source_root / json.loads(data)["origin"][0], size)
            for side in errors:
                stored = np.asarray(Image.open(io.BytesIO(members[f"{key}.{side}.jpg"])).convert("RGB"), dtype=np.float64)
                errors[side].append(float(((stored - reference[side]) ** 2).mean()))
    return {"pairs": train.count, "kib_per_pair": workloads.shard_kib_per_pair(prepared),
            **{f"{side}_psnr": psnr(float(np.mean(values))) for side, values in errors.items()},
            **{f"{side}_worst_psnr": psnr(max(values)) for side, values in errors.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a pix2pix-layout folder, photo | labels (e.g. facades)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--chroma", nargs="+", default=["4:4:4", "4:2:0"], choices=["4:4:4", "4:2:2", "4:2:0"])
    args = parser.parse_args()

    print(f"{args.data}, {args.image_size} px, both sides at each subsampling; PSNR of the stored halves "
          "against the source files' pixels (all pairs / worst pair)")
    print("| jpeg_chroma | KiB per pair | labels (source) | photo (target) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="pairgan-chroma-") as scratch:
        for chroma in args.chroma:
            out = Path(scratch) / chroma.replace(":", "")
            prepared = workloads.prepare_pix2pix_folder(args.data, out, args.image_size,
                                                        {"val_fraction": 0.0, "jpeg_chroma": {"source": chroma, "target": chroma}})
            result = fidelity(prepared, args.data.resolve(), args.image_size)
            print(f"| {chroma} | {result['kib_per_pair']:.1f} | {result['src_psnr']:.2f} / {result['src_worst_psnr']:.2f} dB "
                  f"| {result['tgt_psnr']:.2f} / {result['tgt_worst_psnr']:.2f} dB |")


if __name__ == "__main__":
    main()
