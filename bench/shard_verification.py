"""Shard verification cost: what checking shards against the manifest adds to building a loader, once per node.

    python bench/shard_verification.py --data FACADES     # prepare the facades folder (pix2pix layout) at 256 px
    python bench/shard_verification.py --prepared DIR     # reuse a prepared folder (holds manifest.json)

Times `make_loader` over the train split three ways: the first time on a node (every shard
hashed), again with the record of that check (a later run: no hashing), and the hashing
alone (SHA-256 throughput of this machine). Run by hand; results go to docs/benchmarks.md.
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path


def prepare_facades(source: Path, out: Path, image_size: int) -> Path:
    from components.config import read_yaml_mapping, with_overrides
    from components.config.data import DataParams
    from components.data.sources import open_source
    from components.data.writer import prepare_dataset

    params = DataParams.model_validate(
        with_overrides(read_yaml_mapping("params/data.yaml"), {
            "source": {"kind": "pix2pix", "path": str(source.resolve()), "direction": "BtoA"}, "image_size": image_size,
        }),
        context={"base_dir": Path.cwd()},
    )
    prepare_dataset(params, open_source(params, Path.cwd()), out, progress=False)
    return out


def main() -> None:
    from components.config import read_yaml_mapping
    from components.config.data import LoaderParams
    from components.data.integrity import file_sha256
    from components.data.loaders import make_loader
    from components.data.manifest import load_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="pix2pix-layout source folder (the facades set)")
    parser.add_argument("--prepared", type=Path, help="a prepared folder to reuse instead of preparing --data")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--backend", default="torch", choices=["dali", "torch"])
    args = parser.parse_args()
    if args.data is None and args.prepared is None:
        parser.error("give --data (a source to prepare) or --prepared (a prepared folder)")

    with tempfile.TemporaryDirectory(prefix="pairgan-bench-") as folder:
        prepared = args.prepared or prepare_facades(args.data, Path(folder) / "prepared", args.image_size)
        manifest = load_manifest(prepared)
        shards = [Path(manifest.member_location(s.tar)) for s in manifest.split("train").shards]
        size_mib = sum(path.stat().st_size for path in shards) / (1 << 20)
        shipped = read_yaml_mapping("params/data.yaml")["loader"]
        params = LoaderParams.model_validate(
            {**shipped, "backend": args.backend, "load_scale": 1.0, "cache_dir": str(Path(folder) / "cache")}
        )

        def build() -> float:
            started = time.perf_counter()
            make_loader(prepared, "train", params, batch_size=32, train=True)
            return time.perf_counter() - started

        first, later = build(), build()
        started = time.perf_counter()
        for path in shards:
            file_sha256(path)
        hashing = time.perf_counter() - started
        print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}")
        print(f"train split: {manifest.split('train').count} pairs in {len(shards)} shard(s), {size_mib:.1f} MiB")
        print(f"make_loader, first on this node (verifies): {first * 1000:.0f} ms")
        print(f"make_loader, later (record of the check): {later * 1000:.0f} ms")
        print(f"SHA-256 alone: {hashing * 1000:.0f} ms, {size_mib / hashing:.0f} MiB/s")


if __name__ == "__main__":
    main()
