"""The GPU path, proven and measured in one unattended command.

    python bench/gpu_check.py --out OUT [--facades DIR] [--budget-s 420]   # on one GPU
    python bench/gpu_check.py --cpu --out OUT                              # the same code, small, on the CPU

Sections, each in a process of its own (a crash, a hang or a poisoned CUDA context in one
leaves the others running), each stopped at its share of the time budget:

  environment          versions, device, what is importable
  decode               paired decode + resize 286 + crop 256 + flip, pairs/s: the nvjpeg loader
                       at batch 32 and 128, nvJPEG on bytes in memory, DALI `mixed` where installed
  throughput_pix2pix   256 px, batch 48: resident, each switch on/off, and through the loader
  throughput_atme      256 px, batch 32: resident, each switch on/off
  cuda_tests           the suite's tests marked `cuda` (pytest -m cuda)
  correctness          every method, 20 steps eager fp32, then each switch alone (bf16 autocast,
                       channels_last, fused Adam, SDPA off, activation checkpointing, compile,
                       CUDA graphs) and all together: finite losses, loss curves within tolerance
                       of fp32; the exported generator (torch.export, the registry's pt2 graph),
                       saved, loaded and run on the device, against the eager one

Throughput rows give images/s, MFU (model FLOPs of one eager step, counted with
FlopCounterMode, over the device's dense bf16 peak), peak memory and memory per image,
warm-up seconds (compilation), and whether the losses stayed finite. The JSON report
(OUT/gpu_check.json) is rewritten after every item, so a killed run still leaves its
results; the table is printed at the end and stored in the report. Exit status 0: every
item that ran passed (items skipped for the budget are listed); 1: something failed.

Data: --facades DIR (pix2pix JPEGs, photo | labels, 512 x 256; DIR or DIR/train) is
prepared as `pairgan prepare` would (labels -> photo, halves resized to 256, JPEG quality 95,
4:4:4) and repeated to make long epochs; without it, synthetic JPEGs of the same shape are
used. The shards are written here with the standard library's tarfile, in the project's
member layout (KEY.src.jpg, KEY.tgt.jpg, KEY.json, KEY.index) with a manifest from
components.data.manifest, because the project's writer needs DALI's wds2idx, which the GPU
image does not have. Nothing here needs Ray, MLflow, DALI, WebDataset or DVC.
"""

import argparse
import gc
import io
import itertools
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPOSITORY = BENCH.parent
# The GPU machine runs a plain checkout: the project is not installed there.
sys.path[:0] = [str(REPOSITORY), str(BENCH)]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from components.atomic_files import write_json_atomic  # noqa: E402

REPORT_NAME = "gpu_check.json"
FACADES_PAIRS = 400
# Test files holding the suite's `cuda` tests (tests/bench/test_gpu_check_cpu.py checks the list).
CUDA_TEST_FILES = ("tests/data/test_nvjpeg_loader.py", "tests/methods/test_network_equivalence.py",
                   "tests/training/test_performance.py")

# Loss curves of a switch against eager fp32 over the same steps: max over steps and losses of
# |loss - loss_fp32| / max(|loss_fp32|, LOSS_FLOOR). Switches that keep fp32 math reorder sums
# only; bf16 rounds every activation.
TOLERANCE_FP32 = 0.02
TOLERANCE_BF16 = 0.10
LOSS_FLOOR = 0.1
CURVE_LOSSES = ("loss/G", "loss/G_L1", "loss/D")
# The exported generator against the eager one on the same device, max absolute difference
# of images in [-1, 1].
EXPORT_TOLERANCE = 2e-3

TARGETS = {
    "atme_images_per_s": 340.0,  # 5 x the reference's 68.3 at batch 32
    "atme_gib_per_image": 1.0,
    "pix2pix_resident_images_per_s": 3 * 848.0,
    "pix2pix_loader_fraction": 0.95,
    "decode_pairs_per_s": 10_000.0,
}

# Every switch named, so that a row means the same whatever the shipped defaults are.
ALL_OFF = {"autocast": "none", "channels_last": False, "fused_adam": False, "compile": False,
           "cuda_graphs": False, "sdpa": True, "activation_checkpointing": False}
ALL_ON = {"autocast": "bf16", "channels_last": True, "fused_adam": True, "compile": True,
          "cuda_graphs": False, "sdpa": True, "activation_checkpointing": False}
SHIPPED = "shipped defaults (auto)"
# In the order they run: when the budget runs short, the rows at the end are skipped.
THROUGHPUT_VARIANTS: list[tuple[str, dict | None]] = [
    ("fp32 eager", ALL_OFF),
    ("all on", ALL_ON),
    ("bf16 eager", {**ALL_OFF, "autocast": "bf16"}),
    ("all on - compile", {**ALL_ON, "compile": False}),
    ("all on + activation checkpointing", {**ALL_ON, "activation_checkpointing": True}),
    ("all on + CUDA graphs", {**ALL_ON, "cuda_graphs": True}),
    ("all on - channels_last", {**ALL_ON, "channels_last": False}),
    ("all on - sdpa", {**ALL_ON, "sdpa": False}),
    ("all on - bf16", {**ALL_ON, "autocast": "none"}),
    ("all on - fused Adam", {**ALL_ON, "fused_adam": False}),
    (SHIPPED, None),
]
# The cheap eager switches first: compiling runs take the rest of the section's time.
CORRECTNESS_VARIANTS: list[tuple[str, dict, float]] = [
    ("bf16", {**ALL_OFF, "autocast": "bf16"}, TOLERANCE_BF16),
    ("channels_last", {**ALL_OFF, "channels_last": True}, TOLERANCE_FP32),
    ("fused_adam", {**ALL_OFF, "fused_adam": True}, TOLERANCE_FP32),
    ("sdpa off", {**ALL_OFF, "sdpa": False}, TOLERANCE_FP32),
    ("activation_checkpointing", {**ALL_OFF, "activation_checkpointing": True}, TOLERANCE_FP32),
    ("compile", {**ALL_OFF, "compile": True}, TOLERANCE_FP32),
    ("all on", {**ALL_ON, "activation_checkpointing": True}, TOLERANCE_BF16),
    ("cuda_graphs", {**ALL_OFF, "compile": True, "cuda_graphs": True}, TOLERANCE_FP32),
]
CORRECTNESS_METHODS = ("pix2pix", "atme", "diffusion_gan", "ddgan")
HAS_FULL_ATTENTION = {"atme", "ddgan"}


@dataclass(frozen=True)
class Scale:
    """Sizes of one mode: the GPU figures, or the same code small enough for CI on 2 cores."""

    image_size: int
    # merged into each method's reference `method:` params (the CPU mode's networks are narrow)
    network_overrides: dict[str, dict]
    pix2pix_batch: int
    atme_batch: int
    warmup_steps: int
    timed_steps: dict[str, int]
    loader_steps: int
    decode_batches: tuple[int, ...]
    decode_epochs: int
    repeat: int  # copies of the source pairs in the shards (long epochs)
    synthetic_pairs: int
    correctness_size: int
    correctness_batch: int
    correctness_steps: int
    section_caps_s: dict[str, float]
    # seconds an item is expected to take, by kind: an item is skipped when its section has less left
    estimates_s: dict[str, float]
    # the rows run (None: all); the CPU mode runs a few, which exercise every code path
    throughput_variants: tuple[str, ...] | None = None
    correctness_variants: tuple[str, ...] | None = None


GPU = Scale(
    image_size=256, network_overrides={}, pix2pix_batch=48, atme_batch=32, warmup_steps=3,
    timed_steps={"pix2pix": 20, "atme": 10}, loader_steps=60, decode_batches=(32, 128), decode_epochs=3,
    repeat=8, synthetic_pairs=FACADES_PAIRS, correctness_size=64, correctness_batch=4, correctness_steps=20,
    section_caps_s={"environment": 15, "decode": 30, "throughput_pix2pix": 75, "throughput_atme": 130,
                    "cuda_tests": 60, "correctness": 105},
    estimates_s={"decode": 10, "eager_row": 12, "compile_row": 40, "loader_row": 15, "baseline": 6, "export": 12,
                 "correctness": 5, "correctness_compile": 25, "pytest": 20},
)
TINY_UNET = {"width": 8, "channel_multipliers": [1, 2], "attention_heads": 2, "attention_head_dim": 8}
TINY_PIX2PIX = {"generator": {"ngf": 8}, "discriminator": {"ndf": 8}}
CPU = Scale(
    image_size=32,
    network_overrides={
        "pix2pix": TINY_PIX2PIX, "diffusion_gan": TINY_PIX2PIX,
        "atme": {"generator": {**TINY_UNET, "attention_levels": [0, 1]}, "discriminator": {"ndf": 8}, "w": {"channels": [8, 8, 8]}},
        "ddgan": {"generator": {**TINY_UNET, "attention_levels": [1]}, "discriminator": {"ndf": 8}, "nz": 8},
    }, pix2pix_batch=4, atme_batch=2, warmup_steps=1,
    timed_steps={"pix2pix": 2, "atme": 2}, loader_steps=3, decode_batches=(8,), decode_epochs=1,
    repeat=1, synthetic_pairs=12, correctness_size=32, correctness_batch=2, correctness_steps=3,
    section_caps_s={"environment": 20, "decode": 20, "throughput_pix2pix": 30, "throughput_atme": 30,
                    "cuda_tests": 40, "correctness": 60},
    estimates_s={"decode": 2, "eager_row": 2, "compile_row": 2, "loader_row": 3, "baseline": 2, "export": 8,
                 "correctness": 2, "correctness_compile": 2, "pytest": 10},
    throughput_variants=("fp32 eager", "all on", "all on + activation checkpointing", SHIPPED),
    correctness_variants=("bf16", "channels_last", "sdpa off", "all on"),
)
SECTIONS = ("environment", "decode", "throughput_pix2pix", "throughput_atme", "cuda_tests", "correctness")


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


# ---------------------------------------------------------------- data: shards from JPEGs


def facades_files(folder: Path) -> list[Path]:
    train = folder / "train"
    files = sorted((train if train.is_dir() else folder).glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no .jpg files in {folder} or {train}")
    return files


def encode_half(image: Image.Image, size: int) -> bytes:
    # as components/data/pairs.py encodes: bicubic resize, quality 95, 4:4:4 chroma
    buffer = io.BytesIO()
    image.resize((size, size), Image.BICUBIC).save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def encode_facade(path: Path, size: int) -> tuple[bytes, bytes]:
    """(source, target) JPEGs of one facades file: labels (right half) -> photo (left half)."""
    with Image.open(path) as opened:
        both = opened.convert("RGB")
    width, height = both.size
    photo, labels = both.crop((0, 0, width // 2, height)), both.crop((width // 2, 0, width, height))
    return encode_half(labels, size), encode_half(photo, size)


def synthetic_facade(number: int, size: int) -> tuple[bytes, bytes]:
    """A photo-like smooth field and its quantised 'label map', at the facades' 256 x 256 per half."""
    rng = np.random.default_rng(number)
    coarse = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    photo = np.asarray(coarse.resize((256, 256), Image.BICUBIC)).astype(np.int16)
    photo = np.clip(photo + rng.integers(-20, 21, size=photo.shape), 0, 255).astype(np.uint8)
    labels = (photo // 64 * 85).astype(np.uint8)
    return encode_half(Image.fromarray(labels), size), encode_half(Image.fromarray(photo), size)


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    return info, io.BytesIO(data)


def write_shards(pairs: list[tuple[bytes, bytes]], out: Path, image_size: int, source: str,
                 shard_size: int = 256) -> Path:
    """A prepared data set (train split only) in the project's layout; returns its folder."""
    import hashlib

    from components.data.manifest import SampleEntry, ShardEntry, SplitManifest, manifest_body, write_manifest

    (out / "train").mkdir(parents=True)
    shards, samples = [], []
    for number, start in enumerate(range(0, len(pairs), shard_size)):
        tar_name, index_name = f"train/train-{number:06d}.tar", f"train/train-{number:06d}.idx"
        chunk = pairs[start : start + shard_size]
        with tarfile.open(out / tar_name, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, (source_jpeg, target_jpeg) in enumerate(chunk):
                index, key = start + offset, f"pair{start + offset:06d}"
                checksum = hashlib.sha256(source_jpeg + target_jpeg).hexdigest()
                meta = {"key": key, "index": index, "source": source, "origin": [key], "sha256": checksum}
                for suffix, data in (("src.jpg", source_jpeg), ("tgt.jpg", target_jpeg),
                                     ("json", json.dumps(meta, sort_keys=True).encode()),
                                     ("index", struct.pack("<q", index))):
                    tar.addfile(*_member(f"{key}.{suffix}", data))
                samples.append(SampleEntry(key, index, number, [key], checksum))
        if shutil.which("wds2idx"):  # DALI's index, where DALI is installed
            subprocess.run(["wds2idx", str(out / tar_name), str(out / index_name)], check=True, capture_output=True)
        digest = hashlib.sha256((out / tar_name).read_bytes()).hexdigest()
        shards.append(ShardEntry(tar_name, index_name, digest, len(chunk), start))
    body = manifest_body(image_size, source, {"image_size": image_size}, {"train": SplitManifest(shards, samples)}, [], [])
    write_manifest(out, body)
    return out


def prepare_data(args: argparse.Namespace, scale: Scale, scratch: Path) -> dict:
    """Encode the pairs once and write the shards; what was used goes into the report."""
    started = time.perf_counter()
    size = scale.image_size
    pairs, origin = [], ""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        if args.facades is not None:
            try:
                files = facades_files(args.facades)[: FACADES_PAIRS if not args.cpu else scale.synthetic_pairs]
                pairs = list(pool.map(lambda path: encode_facade(path, size), files))
                origin = f"facades ({len(files)} pairs from {args.facades})"
            except (OSError, ValueError) as error:  # the run goes on with synthetic pairs, and says so
                origin = f"FACADES NOT USED ({error_text(error)}): "
        if not pairs:
            pairs = list(pool.map(lambda number: synthetic_facade(number, size), range(scale.synthetic_pairs)))
            origin += f"synthetic 512x256 JPEG pairs ({len(pairs)}); pass --facades DIR for the real set"
    folder = write_shards(pairs * scale.repeat, scratch / "prepared", size, origin)
    return {
        "folder": str(folder), "origin": origin, "pairs": len(pairs) * scale.repeat, "repeat": scale.repeat,
        "mean_jpeg_kb": round(sum(len(s) + len(t) for s, t in pairs) / (2 * len(pairs)) / 1024, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------- one section, in its own process


class SectionRecord:
    """A section's results, rewritten to its part file after every item."""

    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline = path, deadline
        self.data: dict = {"items": [], "notes": []}

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        write_json_atomic(self.path, self.data, sort_keys=False)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        log(text)
        self.save()

    def attempt(self, name: str, estimate_s: float, run: Callable[[], dict]) -> dict | None:
        """Run one item unless the budget cannot hold it; a failure is recorded, not raised."""
        if self.time_left() < estimate_s:
            item = {"name": name, "status": "skipped",
                    "reason": f"time budget: {max(self.time_left(), 0):.0f} s left, the item needs about {estimate_s:.0f} s"}
            self.data["items"].append(item)
            self.save()
            log(f"{name}: skipped ({item['reason']})")
            return None
        started = time.perf_counter()
        try:
            result = run()
            item = {"name": name, "status": result.pop("status", "ok"), **result}
        except Exception as error:
            item = {"name": name, "status": "error", "error": error_text(error),
                    "traceback": traceback.format_exc(limit=6)[-3000:]}
        item["seconds"] = round(time.perf_counter() - started, 1)
        self.data["items"].append(item)
        self.save()
        log(f"{name}: {item['status']} in {item['seconds']} s  {summarise_item(item)}")
        return item


@dataclass
class Context:
    args: argparse.Namespace
    scale: Scale
    prepared: Path | None
    dataset_size: int

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.args.cpu else "cuda")


def switches_for(context: Context, overrides: dict | None) -> dict | None:
    """The CPU mode runs no compile and no CUDA graphs (a C++ build per graph on two cores)."""
    if overrides is None or not context.args.cpu:
        return overrides
    return {**overrides, "compile": False, "cuda_graphs": False}


def open_loader(context: Context, batch_size: int, train: bool = True, backend: str = "nvjpeg"):
    """The product's loader over the prepared shards: nvJPEG on the GPU; in --cpu mode the same
    loader class with Pillow decoding (torchvision is not installed next to the CPU torch)."""
    import train_throughput as throughput

    from components.data.loaders import make_loader

    params = throughput.loader_params(context.scale.image_size, {"backend": backend, "num_threads": os.cpu_count() or 1})
    if context.args.cpu and backend == "nvjpeg":
        from components.data.manifest import load_manifest
        from components.data.nvjpeg_loader import NvjpegPairLoader, pil_decode

        manifest = load_manifest(context.prepared)
        return NvjpegPairLoader(manifest, "train", shard_files(context.prepared), params, batch_size, train, 0, 1, 0,
                                context.device, pil_decode)
    return make_loader(context.prepared, "train", params, batch_size, train=train, device=context.device)


def shard_files(prepared: Path) -> list[Path]:
    return sorted((prepared / "train").glob("train-*.tar"))


def clear_device(context: Context, forget_compiled: bool = True) -> None:
    """Free the last run's memory and peak statistics; forget_compiled: its compiled graphs too,
    so that a row's warm-up includes its own compilation."""
    import torch

    if forget_compiled:
        torch._dynamo.reset()
    gc.collect()
    if context.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def section_environment(context: Context, record: SectionRecord) -> None:
    def describe() -> dict:
        import importlib.util

        import torch

        def importable(name: str) -> bool:
            try:
                return importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                return False

        facts = {
            "python": platform.python_version(), "machine": platform.node(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "importable": {name: importable(name) for name in
                           ("torchvision", "triton", "pydantic", "nvidia.dali", "ray", "mlflow", "webdataset", "dvc")},
        }
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            facts |= {"device": properties.name, "capability": f"{properties.major}.{properties.minor}",
                      "memory_gib": round(properties.total_memory / 2**30, 1),
                      "multiprocessors": properties.multi_processor_count, "cudnn": torch.backends.cudnn.version()}
        if facts["importable"]["torchvision"]:
            import torchvision

            facts["torchvision"] = torchvision.__version__
        if facts["importable"]["triton"]:
            import triton

            facts["triton"] = triton.__version__
        return facts

    record.attempt("environment", 5, describe)


def section_decode(context: Context, record: SectionRecord) -> None:
    import torch

    device = context.device

    def loader_rate(batch_size: int, backend: str) -> dict:
        loader = open_loader(context, batch_size, backend=backend)
        for _ in loader:  # warm-up epoch: threads, decoder handles, kernels, page cache
            pass
        pairs, started = 0, time.perf_counter()
        for _ in range(context.scale.decode_epochs):
            for batch in loader:
                pairs += batch["source"].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        return {"pairs_per_s": round(pairs / seconds, 1), "pairs": pairs, "batch_size": batch_size,
                "backend": loader.backend, "decoder": "Pillow (CPU stand-in)" if context.args.cpu else backend}

    for batch_size in context.scale.decode_batches:
        record.attempt(f"nvjpeg loader, batch {batch_size}", context.scale.estimates_s["decode"],
                       lambda batch_size=batch_size: loader_rate(batch_size, "nvjpeg"))

    def in_memory_rate(batch_size: int) -> dict:
        """nvJPEG decode + the same augmentation on bytes already in memory: the loader's ceiling."""
        from components.data.nvjpeg_loader import augmentation_draws, nvjpeg_decode, pil_decode, resize_crop_flip

        blobs: dict[str, list[torch.Tensor]] = {"src.jpg": [], "tgt.jpg": []}
        for path in shard_files(context.prepared):
            with tarfile.open(path) as tar:
                for member in tar:
                    suffix = member.name.partition(".")[2]
                    if suffix in blobs:
                        blobs[suffix].append(torch.frombuffer(bytearray(tar.extractfile(member).read()), dtype=torch.uint8))
        decode = pil_decode if context.args.cpu else nvjpeg_decode
        load, crop = context.scale.image_size * 286 // 256, context.scale.image_size
        count = len(blobs["src.jpg"]) // batch_size * batch_size

        def one_pass(epoch: int) -> int:
            for start in range(0, count, batch_size):
                indices = list(range(start, start + batch_size))
                images = decode(blobs["src.jpg"][start : start + batch_size] + blobs["tgt.jpg"][start : start + batch_size], device)
                halves = torch.stack(images).view(2, batch_size, *images[0].shape)
                crops, flips = augmentation_draws(0, epoch, indices, load, crop, True)
                resize_crop_flip(halves, load, torch.from_numpy(crops).to(device), torch.from_numpy(flips).to(device), crop)
            return count

        one_pass(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        pairs = sum(one_pass(epoch) for epoch in range(1, 1 + context.scale.decode_epochs))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"pairs_per_s": round(pairs / (time.perf_counter() - started), 1), "pairs": pairs, "batch_size": batch_size}

    record.attempt(f"nvJPEG + augmentation on bytes in memory, batch {context.scale.decode_batches[-1]}",
                   context.scale.estimates_s["decode"],
                   lambda: in_memory_rate(context.scale.decode_batches[-1]))

    from components.data.loaders import dali_available

    if context.args.cpu:
        record.note("DALI not measured in --cpu mode (the GPU figure is DALI's `mixed` decoding)")
    elif not dali_available():
        record.note("DALI mixed decoding not measured: nvidia.dali is not installed here")
    else:
        record.attempt("dali loader (mixed decoding), batch 128", context.scale.estimates_s["decode"],
                       lambda: loader_rate(128, "dali"))


def resident_batch(context: Context, batch_size: int) -> tuple[dict, str]:
    """One real batch from the loader, kept on the device; a synthetic one if the loader fails."""
    import torch

    try:
        batches = iter(open_loader(context, batch_size))
        batch = next(batches)
        batches.close()  # stops the loader's threads
        return {key: value.to(context.device) for key, value in batch.items()}, "first batch of the nvjpeg loader"
    except Exception as error:
        size, generator = context.scale.image_size, torch.Generator().manual_seed(0)
        batch = {
            "source": torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1,
            "target": torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1,
            "index": torch.arange(batch_size) % context.dataset_size,
            "flip": torch.zeros(batch_size, dtype=torch.bool),
            "crop": torch.zeros(batch_size, 2, dtype=torch.int64),
        }
        return {key: value.to(context.device) for key, value in batch.items()}, f"synthetic (loader failed: {error_text(error)})"


def dynamo_counts() -> dict:
    import torch

    counters = torch._dynamo.utils.counters
    return {"compiled_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def throughput_section(context: Context, record: SectionRecord, method: str, batch_size: int) -> None:
    import torch
    import train_throughput as throughput

    from components.training.loop import TrainingSession

    device, scale = context.device, context.scale
    model = throughput.model_params(method, scale.image_size, scale.network_overrides.get(method))
    batch, origin = resident_batch(context, batch_size)
    record.note(f"{method}: batch {batch_size} at {scale.image_size} px, resident batch: {origin}")
    steps = scale.timed_steps[method]
    found: dict = {"flops": None, "peak": throughput.peak_tflops(device)}
    seen: dict[str, str] = {}

    def run(name: str, overrides: dict | None, source: str) -> dict:
        clear_device(context)
        before = dynamo_counts()
        train = throughput.train_params(batch_size, overrides) if overrides is not None else throughput.train_params(batch_size)
        session = TrainingSession(model, train, context.dataset_size, device)
        batches = itertools.repeat(batch) if source == "resident" else throughput.endless(open_loader(context, batch_size))
        warmup_s, _ = throughput.time_steps(session, batches, scale.warmup_steps, device)
        if found["flops"] is None and not session.switches.compile:
            found["flops"] = throughput.flops_per_image(session, batch, batch_size)
        timed = steps if source == "resident" else scale.loader_steps
        seconds, images = throughput.time_steps(session, batches, timed, device)
        rate = images / seconds
        finite = all(bool(torch.isfinite(value)) for value in session.stats.step_values.values())
        peak_gib = throughput.peak_memory_gib(device)
        after = dynamo_counts()
        flops, peak = found["flops"], found["peak"]
        row = {
            "method": method, "variant": name, "mode": source, "batch_size": batch_size, "image_size": scale.image_size,
            "images_per_s": round(rate, 1), "step_ms": round(1000 * seconds / timed, 2),
            "warmup_s": round(warmup_s, 1), "compile_s": round(max(warmup_s - scale.warmup_steps * seconds / timed, 0), 1),
            "peak_memory_gib": round(peak_gib, 2), "gib_per_image": round(peak_gib / batch_size, 3),
            "train_gflop_per_image": round(flops / 1e9, 3) if flops else None,
            "achieved_tflops": round(flops * rate / 1e12, 1) if flops else None,
            "mfu": round(flops * rate / (peak * 1e12), 4) if flops and peak else None,
            "losses_finite": finite, "switches": session.switches.summary(),
            "compiled_graphs": after["compiled_graphs"] - before["compiled_graphs"],
            "graph_breaks": after["graph_breaks"] - before["graph_breaks"],
        }
        if not finite:
            row["status"] = "failed"
            row["error"] = "a loss is not finite: " + ", ".join(
                f"{key}={float(value):.4g}" for key, value in session.stats.step_values.items())
        del session, batches
        return row

    resident_rates: dict[str, float] = {}
    for name, overrides in THROUGHPUT_VARIANTS:
        if name == "all on - sdpa" and method not in HAS_FULL_ATTENTION:
            continue  # the pix2pix networks have no attention
        if scale.throughput_variants is not None and name not in scale.throughput_variants:
            continue
        overrides = switches_for(context, overrides)
        key = json.dumps(overrides, sort_keys=True)
        if key in seen:
            record.note(f"{method} {name}: same switches as '{seen[key]}' in this mode, not repeated")
            continue
        seen[key] = name
        cost = scale.estimates_s["compile_row" if overrides is None or overrides.get("compile") else "eager_row"]
        item = record.attempt(f"{method} resident {name}", cost, lambda name=name, overrides=overrides: run(name, overrides, "resident"))
        if item is not None and item["status"] == "ok":
            resident_rates[name] = item["images_per_s"]
        if method == "pix2pix" and name == "all on":
            loaded = record.attempt(f"{method} loader {name}", cost + scale.estimates_s["loader_row"],
                                    lambda overrides=overrides: run("all on", overrides, "loader"))
            if loaded is not None and loaded["status"] == "ok" and resident_rates.get("all on"):
                loaded["fraction_of_resident"] = round(loaded["images_per_s"] / resident_rates["all on"], 3)
                record.save()


def section_throughput_pix2pix(context: Context, record: SectionRecord) -> None:
    throughput_section(context, record, "pix2pix", context.scale.pix2pix_batch)


def section_throughput_atme(context: Context, record: SectionRecord) -> None:
    throughput_section(context, record, "atme", context.scale.atme_batch)


def curve_deviation(curve: dict[str, list[float]], reference: dict[str, list[float]]) -> dict[str, float]:
    return {
        name: max(abs(value - base) / max(abs(base), LOSS_FLOOR) for value, base in zip(curve[name], reference[name]))
        for name in CURVE_LOSSES if name in reference and name in curve
    }


def section_correctness(context: Context, record: SectionRecord) -> None:
    import torch
    import train_throughput as throughput

    from components.data.batch import Batch
    from components.training.loop import TrainingSession

    device, scale = context.device, context.scale
    size, batch_size = scale.correctness_size, scale.correctness_batch
    # Dropout off: compiled code and CUDA graphs draw other random numbers than eager, and
    # dropout masks would then differ between the runs compared.
    no_dropout = {"pix2pix": {"generator": {"dropout": 0.0}}, "diffusion_gan": {"generator": {"dropout": 0.0}}}
    models = {method: throughput.model_params(method, size, throughput.merged(scale.network_overrides.get(method, {}),
                                                                     no_dropout.get(method, {})))
              for method in CORRECTNESS_METHODS}
    generator = torch.Generator().manual_seed(0)
    count = 4 * batch_size
    sources = torch.rand(count, 3, size, size, generator=generator) * 2 - 1
    targets = (0.8 * sources[:, [2, 0, 1]] - 0.1).clamp(-1, 1)  # a learnable colour transform
    batches: list[Batch] = []
    for step in range(scale.correctness_steps):
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % count
        batches.append({"source": sources[rows], "target": targets[rows], "index": rows,
                        "flip": torch.zeros(batch_size, dtype=torch.bool), "crop": torch.zeros(batch_size, 2, dtype=torch.int64)})
    record.note(f"{len(CORRECTNESS_METHODS)} methods at {size} px, batch {batch_size}, {scale.correctness_steps} steps; "
                f"tolerance {TOLERANCE_FP32:.0%} (fp32 switches) / {TOLERANCE_BF16:.0%} (bf16) of the fp32 losses, "
                f"export {EXPORT_TOLERANCE}")

    def train(method: str, overrides: dict) -> tuple[TrainingSession, dict[str, list[float]]]:
        session = TrainingSession(models[method], throughput.train_params(batch_size, overrides), count, device)
        curve: dict[str, list[float]] = {}
        for batch in batches:
            session.train_step(batch)
            for name, value in session.stats.step_values.items():
                curve.setdefault(name, []).append(float(value))
        return session, curve

    references: dict[str, dict[str, list[float]]] = {}
    # torch.export traces every op in Python: a U-Net's export takes ~20 s on two busy cores
    export_methods = ("pix2pix",) if context.args.cpu else CORRECTNESS_METHODS
    if context.args.cpu:
        record.note("--cpu: the export check runs for pix2pix only (the GPU run exports every method)")
    for method in CORRECTNESS_METHODS:
        def baseline(method: str = method) -> dict:
            clear_device(context, forget_compiled=False)
            session, curve = train(method, ALL_OFF)
            references[method] = curve
            finite = all(math.isfinite(value) for values in curve.values() for value in values)
            result = {"method": method, "variant": "fp32 eager", "losses_finite": finite,
                      "final": {name: round(values[-1], 4) for name, values in curve.items() if name in CURVE_LOSSES}}
            if method in export_methods:
                result |= export_check(session, device)
            if not finite or not result.get("export_ok", True):
                result["status"] = "failed"
            return result

        exports = method in export_methods
        record.attempt(f"{method} fp32 eager" + (" + export" if exports else ""),
                       scale.estimates_s["baseline"] + (scale.estimates_s["export"] if exports else 0), baseline)

    for variant, overrides, tolerance in CORRECTNESS_VARIANTS:
        if scale.correctness_variants is not None and variant not in scale.correctness_variants:
            continue
        overrides = switches_for(context, overrides)
        for method in CORRECTNESS_METHODS:
            if variant == "sdpa off" and method not in HAS_FULL_ATTENTION:
                continue
            if method not in references:
                record.data["items"].append({"name": f"{method} {variant}", "status": "skipped",
                                             "reason": "no fp32 eager curve to compare with"})
                continue

            def compare(method: str = method, overrides: dict = overrides, tolerance: float = tolerance,
                        variant: str = variant) -> dict:
                # compiled blocks stay cached across methods of the same shapes: compile time is not measured here
                clear_device(context, forget_compiled=False)
                _, curve = train(method, overrides)
                deviation = curve_deviation(curve, references[method])
                finite = all(math.isfinite(value) for values in curve.values() for value in values)
                worst = max(deviation.values())
                return {"method": method, "variant": variant, "losses_finite": finite, "tolerance": tolerance,
                        "max_relative_deviation": {name: round(value, 5) for name, value in deviation.items()},
                        "status": "ok" if finite and worst <= tolerance else "failed"}

            record.attempt(f"{method} {variant}",
                           scale.estimates_s["correctness_compile" if overrides.get("compile") else "correctness"], compare)
    if context.args.cpu:
        record.note("--cpu: no compile, no CUDA graphs (the GPU run covers them), switches "
                    + ", ".join(scale.correctness_variants or ()))


def export_check(session, device) -> dict:
    """The registry's route: torch.export on the CPU with a dynamic batch (as mlflow's pt2 flavour
    does), save, load, move to the device; against the eager generator on the device."""
    import torch
    from torch.export import Dim
    from torch.export.passes import move_to_device_pass

    from components.methods.translator import export_translator, translator_from_export

    exported = export_translator(session)
    size = session.model.image_size
    eager = translator_from_export(exported).to(device)
    graph = torch.export.export(translator_from_export(exported), (torch.zeros(2, 3, size, size),),
                                dynamic_shapes=[{0: Dim.AUTO}])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt2"
        torch.export.save(graph, path)
        loaded = move_to_device_pass(torch.export.load(path), device).module()
    source = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(7)  # DDGAN samples noise: the same draws for both
        expected = eager(source)
        torch.manual_seed(7)
        actual = loaded(source)
    difference = float((expected - actual).abs().max())
    return {"export_max_abs_difference": difference, "export_ok": bool(difference <= EXPORT_TOLERANCE),
            "export_batch": 3}


def pytest_outcomes(output: str) -> dict[str, str]:
    """test id -> PASSED, FAILED, ERROR or SKIPPED, from `pytest -v` lines (complete or not)."""
    outcomes = {}
    for line in output.splitlines():
        parts = line.split(" ")
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            outcomes[parts[0]] = parts[1]
    return outcomes


def section_cuda_tests(context: Context, record: SectionRecord) -> None:
    def run_pytest() -> dict:
        command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "cuda", *CUDA_TEST_FILES]
        left = max(record.time_left() - 5, 10)
        try:
            completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=left)
            output, finished, returncode = completed.stdout, True, completed.returncode
        except subprocess.TimeoutExpired as timeout:  # what ran so far still counts
            output = timeout.stdout.decode(errors="replace") if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
            finished, returncode = False, None
        outcomes = pytest_outcomes(output)
        counts = {name: sum(1 for value in outcomes.values() if value == outcome)
                  for name, outcome in (("passed", "PASSED"), ("failed", "FAILED"), ("errors", "ERROR"), ("skipped", "SKIPPED"))}
        failed = sorted(test for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR"))
        ok = finished and returncode in (0, 5) and not failed
        result = {"tests": len(outcomes), **counts, "failed_tests": failed, "finished": finished,
                  "returncode": returncode, "status": "ok" if ok else "failed"}
        if not ok:
            result["error"] = (f"{len(failed)} failed: {', '.join(failed)}" if failed else
                               "pytest did not finish in the time left" if not finished else f"pytest exited {returncode}")
            result["output_tail"] = output[-4000:]
        return result

    record.attempt("pytest -m cuda", context.scale.estimates_s["pytest"], run_pytest)


SECTION_FUNCTIONS: dict[str, Callable[[Context, SectionRecord], None]] = {
    "environment": section_environment,
    "decode": section_decode,
    "correctness": section_correctness,
    "throughput_pix2pix": section_throughput_pix2pix,
    "throughput_atme": section_throughput_atme,
    "cuda_tests": section_cuda_tests,
}


def run_section(args: argparse.Namespace) -> int:
    scale = CPU if args.cpu else GPU
    if args.cpu:
        import torch

        # One intra-op thread: with other work on the cores, OpenMP's spinning threads make
        # these tiny networks several times slower, not faster.
        torch.set_num_threads(1)
    record = SectionRecord(args.part, args.deadline)
    record.save()
    prepared = Path(args.prepared) if args.prepared else None
    dataset_size = 64
    if prepared is not None:
        from components.data.manifest import load_manifest

        dataset_size = load_manifest(prepared).split("train").count
    context = Context(args, scale, prepared, dataset_size)
    if args.section == "decode" and prepared is None:
        record.note("no prepared shards (see the data error in the report): nothing to decode")
        return 0
    try:
        SECTION_FUNCTIONS[args.section](context, record)
    except Exception as error:  # outside any item: the section could not go on
        record.data["error"] = error_text(error)
        record.data["traceback"] = traceback.format_exc(limit=8)[-3000:]
        record.save()
        log(f"section {args.section} stopped: {record.data['error']}")
        return 1
    return 0


# ---------------------------------------------------------------- the orchestrating process


def summarise_item(item: dict) -> str:
    if item.get("status") == "skipped":
        return item.get("reason", "")
    if "error" in item and item.get("status") != "ok":
        return item["error"].splitlines()[0][:200]
    parts = []
    if "images_per_s" in item:
        parts.append(f"{item['images_per_s']:,.1f} img/s")
        if item.get("mfu") is not None:
            parts.append(f"MFU {item['mfu']:.1%}")
        parts.append(f"{item['peak_memory_gib']:.2f} GiB ({item['gib_per_image']:.3f}/img)")
        parts.append(f"warm-up {item['warmup_s']} s")
        if item.get("fraction_of_resident") is not None:
            parts.append(f"{item['fraction_of_resident']:.0%} of resident")
    if "pairs_per_s" in item:
        parts.append(f"{item['pairs_per_s']:,.0f} pairs/s")
    if "max_relative_deviation" in item:
        worst = max(item["max_relative_deviation"].values(), default=0.0)
        parts.append(f"max deviation {worst:.2%} (tolerance {item['tolerance']:.0%})")
    if "export_max_abs_difference" in item:
        parts.append(f"export |diff| {item['export_max_abs_difference']:.2e}")
    if "tests" in item:
        parts.append(f"{item['passed']} passed, {item['failed'] + item['errors']} failed, {item['skipped']} skipped")
    if item.get("losses_finite") is False:
        parts.append("NON-FINITE LOSS")
    return ", ".join(parts)


def best_row(report: dict, section: str, mode: str = "resident") -> dict | None:
    rows = [item for item in report["sections"].get(section, {}).get("items", [])
            if item.get("status") == "ok" and item.get("mode") == mode]
    return max(rows, key=lambda row: row["images_per_s"], default=None)


def row_named(report: dict, section: str, name: str) -> dict | None:
    return next((item for item in report["sections"].get(section, {}).get("items", [])
                 if item.get("name") == name and item.get("status") == "ok"), None)


def target_lines(report: dict) -> list[str]:
    """Each target of the issue against the best measured row."""
    lines = []

    def verdict(value: float | None, target: float, higher: bool) -> str:
        if value is None:
            return "not measured"
        return "met" if (value >= target if higher else value <= target) else "NOT met"

    atme = best_row(report, "throughput_atme")
    lines.append(f"ATME >= {TARGETS['atme_images_per_s']:.0f} img/s at batch 32: "
                 f"{atme['images_per_s'] if atme else None} ({atme['variant'] if atme else '-'}): "
                 f"{verdict(atme and atme['images_per_s'], TARGETS['atme_images_per_s'], True)}")
    lines.append(f"ATME <= {TARGETS['atme_gib_per_image']} GiB per image: {atme['gib_per_image'] if atme else None}: "
                 f"{verdict(atme and atme['gib_per_image'], TARGETS['atme_gib_per_image'], False)}")
    pix2pix = best_row(report, "throughput_pix2pix")
    lines.append(f"pix2pix resident >= {TARGETS['pix2pix_resident_images_per_s']:.0f} img/s at batch 48: "
                 f"{pix2pix['images_per_s'] if pix2pix else None} ({pix2pix['variant'] if pix2pix else '-'}): "
                 f"{verdict(pix2pix and pix2pix['images_per_s'], TARGETS['pix2pix_resident_images_per_s'], True)}")
    loaded = best_row(report, "throughput_pix2pix", "loader")
    fraction = loaded.get("fraction_of_resident") if loaded else None
    lines.append(f"pix2pix whole loop >= {TARGETS['pix2pix_loader_fraction']:.0%} of resident: {fraction}: "
                 f"{verdict(fraction, TARGETS['pix2pix_loader_fraction'], True)}")
    decode = [item["pairs_per_s"] for item in report["sections"].get("decode", {}).get("items", [])
              if item.get("status") == "ok" and "loader" in item["name"]]
    lines.append(f"decode >= {TARGETS['decode_pairs_per_s']:,.0f} pairs/s through the loader: {max(decode, default=None)}: "
                 f"{verdict(max(decode, default=None), TARGETS['decode_pairs_per_s'], True)}")
    return lines


def switch_lines(report: dict) -> list[str]:
    """What each switch buys, from the on/off rows: the evidence for the `auto` defaults."""
    lines = []
    comparisons = [
        ("bf16 autocast", "all on", "all on - bf16"), ("channels_last", "all on", "all on - channels_last"),
        ("compile", "all on", "all on - compile"), ("fused Adam", "all on", "all on - fused Adam"),
        ("sdpa", "all on", "all on - sdpa"), ("CUDA graphs", "all on + CUDA graphs", "all on"),
        ("activation checkpointing", "all on + activation checkpointing", "all on"),
    ]
    for method, section in (("pix2pix", "throughput_pix2pix"), ("atme", "throughput_atme")):
        for switch, with_name, without_name in comparisons:
            on = row_named(report, section, f"{method} resident {with_name}")
            off = row_named(report, section, f"{method} resident {without_name}")
            if on and off:
                lines.append(f"{method:8s} {switch:25s} speed x{on['images_per_s'] / off['images_per_s']:.2f}, "
                             f"memory x{on['peak_memory_gib'] / max(off['peak_memory_gib'], 1e-9):.2f}")
    return lines


def table(report: dict) -> str:
    lines = [f"GPU check: {report['mode']} mode, {report.get('device', '?')}, {report['elapsed_s']} s of {report['budget_s']} s budget",
             f"data: {report['data'].get('origin', report['data'].get('error'))}"]
    for name, section in report["sections"].items():
        lines.append(f"== {name}: {section['status']} ({section.get('wall_s', 0)} s)")
        for note in section.get("notes", []):
            lines.append(f"   note: {note}")
        for item in section.get("items", []):
            lines.append(f"   {item.get('status', '?'):8s} {item['name']:55s} {summarise_item(item)}")
    lines.append("== targets")
    lines += [f"   {line}" for line in target_lines(report)]
    lines.append("== what each switch buys (on vs off, resident)")
    lines += [f"   {line}" for line in switch_lines(report)] or ["   (no on/off pairs measured)"]
    return "\n".join(lines)


def failed(report: dict) -> bool:
    if "error" in report["data"]:
        return True
    for section in report["sections"].values():
        if section["status"] not in ("ok", "skipped"):
            return True
        if any(item.get("status") not in ("ok", "skipped") for item in section.get("items", [])):
            return True
    return False


def orchestrate(args: argparse.Namespace) -> int:
    scale = CPU if args.cpu else GPU
    started = time.monotonic()
    deadline = started + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / REPORT_NAME
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "mode": "cpu" if args.cpu else "gpu",
        "machine": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget_s,
        "elapsed_s": 0.0, "tolerances": {"fp32_switches": TOLERANCE_FP32, "bf16": TOLERANCE_BF16, "loss_floor": LOSS_FLOOR,
                                         "export_max_abs": EXPORT_TOLERANCE},
        "targets": TARGETS, "data": {}, "sections": {},
    }

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        write_json_atomic(report_path, report, sort_keys=False)

    log(f"{report['mode']} mode, budget {args.budget_s} s, report {report_path}")
    with tempfile.TemporaryDirectory(prefix="pairgan-gpu-check-") as scratch_name:
        scratch = Path(scratch_name)
        try:
            report["data"] = prepare_data(args, scale, scratch)
            log(f"data: {report['data']['pairs']} pairs in shards ({report['data']['origin']}) in {report['data']['seconds']} s")
        except Exception as error:
            report["data"] = {"error": error_text(error)}
            log(f"data could not be prepared: {report['data']['error']}")
        save()
        for name in args.sections:
            left = deadline - time.monotonic()
            cap = scale.section_caps_s[name]
            if left < min(15.0, cap):
                report["sections"][name] = {"status": "skipped", "notes": [f"time budget: {max(left, 0):.0f} s left"], "items": []}
                log(f"section {name}: skipped, {max(left, 0):.0f} s of the budget left")
                save()
                continue
            allowed = min(cap, left)
            part = scratch / f"{name}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--part", str(part),
                       "--deadline", str(time.monotonic() + allowed), "--out", str(args.out)]
            if args.cpu:
                command.append("--cpu")
            if "folder" in report["data"]:
                command += ["--prepared", report["data"]["folder"]]
            log(f"section {name}: up to {allowed:.0f} s")
            section_started = time.monotonic()
            process = subprocess.Popen(command)
            try:
                code = process.wait(timeout=allowed + 20)  # the child stops itself; this is for a hang
                status = "ok" if code == 0 else f"failed (exit status {code})"
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                status = "killed at its time limit"
            section = json.loads(part.read_text()) if part.exists() else {"items": [], "notes": []}
            section["status"] = status
            section["wall_s"] = round(time.monotonic() - section_started, 1)
            if name == "environment" and section["items"]:
                report["device"] = section["items"][0].get("device", report["machine"])
            report["sections"][name] = section
            save()
        report["table"] = table(report)
        save()
    print(report["table"], flush=True)
    return 1 if failed(report) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {REPORT_NAME}")
    parser.add_argument("--cpu", action="store_true", help="the same code, small, on the CPU (CI)")
    parser.add_argument("--facades", type=Path, default=None,
                        help="facades JPEGs (photo | labels, 512x256): DIR/*.jpg or DIR/train/*.jpg; default: synthetic")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total seconds; sections and items that would not fit are skipped (default 420, --cpu 240)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    # internal: one section in a child process
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.budget_s is None:
        args.budget_s = 240.0 if args.cpu else 420.0
    if args.section:
        return run_section(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
