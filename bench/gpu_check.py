"""The GPU path, proven and measured in one unattended command.

    python bench/gpu_check.py --out OUT [--facades DIR]                           # full: 455 s on one GPU
    python bench/gpu_check.py --out OUT --profile short --budget-s 180 [--facades DIR]  # what matters most
    python bench/gpu_check.py --cpu --out OUT [--profile short]                   # the same code, small, on the CPU

Each section runs in a process of its own (a crash, a hang or a poisoned CUDA context in one
leaves the others running) and is stopped at its share of the time budget; within a section,
an item that would not fit in the time left is skipped and listed.

Profile `full` (default budget 455 s):
  environment          versions, device, what is importable
  decode               paired decode + resize 286 + crop 256 + flip, pairs/s: the nvjpeg loader
                       at batch 32 and 128 and nvJPEG on bytes in memory (the loader's ceiling),
                       then the loader on the same pairs prepared with 4:2:0 chroma (params
                       jpeg_chroma), the photos only and both sides; DALI `mixed` where installed
  throughput_pix2pix   256 px, batch 48: resident, each switch on/off, and through the loader
  throughput_atme      256 px, batch 32: resident, each switch on/off
  cuda_tests           the suite's tests marked `cuda` (pytest -m cuda)
  correctness          every method, 20 steps eager fp32, then each switch alone (bf16 autocast,
                       channels_last, fused Adam, SDPA off, activation checkpointing, compile,
                       CUDA graphs), all together and as shipped (auto), each step from the fp32
                       run's state before it: finite losses, losses and the generator's output
                       within tolerance of fp32's; the exported generator (torch.export,
                       the registry's pt2 graph), saved, loaded and run on the device, against
                       the eager one

Profile `short` (default budget 180 s), in the order of what matters most:
  environment
  throughput_atme      256 px, batch 32: the shipped (auto) switches, bf16 eager with the fused
                       group norm in channels_last and in NCHW, then bf16 eager with activation
                       checkpointing (the least memory without compiling)
  throughput_pix2pix   256 px, batch 48, the shipped switches: resident, and through the nvjpeg loader
  decode               the nvjpeg loader at batch 128
  correctness          every method 8 steps eager fp32 and with the shipped switches (each step from
                       fp32's state): finite, within tolerance of fp32; pix2pix's generator
                       exported, loaded and run on the device
  atme_fp32_baseline   ATME eager fp32, the reference's precision, if time remains
  cuda_tests           the cuda tests that compile nothing (pytest -m 'cuda and not compiles'), if
                       time remains; cut at the budget, the item is partial, not failed
It compiles nothing: a first compiled training step costs tens of seconds per compiled network
(ATME compiles its U-Net's blocks and W), more than the items after it together; the full
profile measures compile and CUDA graphs.

Throughput rows give images/s, MFU (model FLOPs of one uncompiled step, counted with
FlopCounterMode, over the device's dense bf16 peak), peak memory and memory per image,
warm-up seconds (compilation), whether the losses stayed finite, and what dynamo compiled
while the row ran (graphs, graph breaks, frames it left eager, compile cache hits and misses:
a compiled row with frames left eager did not measure compiled code). The JSON report
(OUT/gpu_check.json) is rewritten after every item, so a killed run still leaves its
results; the table is printed at the end and stored in the report. Exit status 0: every
item that ran passed (items skipped for the budget, and a test run the budget cut short,
are listed); 1: something failed.

Data: --facades DIR (pix2pix JPEGs, photo | labels, 512 x 256; DIR or DIR/train) is prepared
by the project's writer as `pairgan prepare` would (labels -> photo, 256 px, all pairs in
train), each image repeated to make long epochs; without it, synthetic JPEGs of the same shape
are used, and the report says so. Nothing here needs Ray, MLflow, DALI, WebDataset, DVC or boto3.
"""

import argparse
import io
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
CUDA_TEST_FILES = ("tests/data/test_nvjpeg_loader.py", "tests/methods/test_fused_group_norm.py",
                   "tests/methods/test_network_equivalence.py", "tests/training/test_performance.py",
                   "tests/training/test_resume.py")

# A switch against eager fp32 over the same steps: max over steps and losses of
# |loss - loss_fp32| / max(|loss_fp32|, LOSS_FLOOR), and of the generator's output (its last
# call of the step) ||G - G_fp32|| / ||G_fp32||: the losses alone hardly see the generator's
# inner blocks in the first steps (its output is near 0, the L1 loss near |target|). Each
# switched step starts from the fp32 run's state before that step (weights, optimiser, ATME's
# memory, RNG), so a step's deviation is that step's own: left to run freely, a GAN amplifies
# rounding differences within a few steps (ATME at 64 px, 8 steps, bf16 against fp32 on the
# CPU: 4% to 25% at the last steps across data seeds, with the code before and after a rewrite
# alike), and a fixed tolerance would then measure the seed. Switches that keep fp32 math
# reorder sums only; bf16 rounds every activation.
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

# Every switch named, so that a row means the same whatever the shipped defaults are. TF32 is
# on in every row (as shipped): "fp32" rows run TF32 matrix products and convolutions.
ALL_OFF = {"autocast": "none", "channels_last": False, "fused_adam": False, "tf32": True, "cudnn_benchmark": False,
           "compile": False, "cuda_graphs": False, "sdpa": True, "activation_checkpointing": False, "fused_norm": False}
# fused_norm is for eager mode (compile fuses the norms itself): it has rows of its own
ALL_ON = {"autocast": "bf16", "channels_last": True, "fused_adam": True, "tf32": True, "cudnn_benchmark": True,
          "compile": True, "cuda_graphs": False, "sdpa": True, "activation_checkpointing": False, "fused_norm": False}
# The base of the throughput rows, each of which switches one thing of it: bf16 autocast, fused
# Adam and SDPA, nothing compiled (what `auto` resolves to on CUDA when this was written).
BF16_EAGER = {**ALL_OFF, "autocast": "bf16", "fused_adam": True}
COMPILED = {**BF16_EAGER, "compile": True}
SHIPPED = "shipped defaults (auto)"


@dataclass(frozen=True)
class Row:
    """One throughput measurement: its switches (None: the shipped params, auto) and where its
    batches come from (resident: one batch kept on the device; loader: the nvjpeg loader)."""

    variant: str
    switches: dict | None
    mode: str = "resident"


# The memory switch on the eager base: the least memory per image without compiling.
LEANEST_EAGER = Row("bf16 eager + activation checkpointing", {**BF16_EAGER, "activation_checkpointing": True})
# The DDPM U-Net's group norm + FiLM + SiLU as one operation, in both layouts: NHWC end to end
# is what it makes possible (no copies around cuDNN's NHWC convolutions).
FUSED_NORM_EAGER = Row("bf16 eager + fused norm", {**BF16_EAGER, "fused_norm": True})
FUSED_NORM_CHANNELS_LAST = Row("bf16 eager + fused norm + channels_last", {**BF16_EAGER, "fused_norm": True, "channels_last": True})
# What the U-Net methods have and the pix2pix reference preset's networks do not: full
# attention, and norms fused_norm takes (its batch norms are not).
DDPM_UNET_ONLY_ROWS = {"bf16 eager - sdpa", FUSED_NORM_EAGER.variant, FUSED_NORM_CHANNELS_LAST.variant}
# The correctness runs take pix2pix with the shipped model's instance norms (params/model.yaml),
# which fused_norm takes too; Diffusion-GAN keeps its preset's batch norms, so both kinds of
# norm meet every switch.
SHIPPED_PIX2PIX_NORMS = {"generator": {"norm": "instance"}, "discriminator": {"norm": "instance"}}
FUSED_NORM_METHODS = {"pix2pix", "atme", "ddgan"}
# The correctness variants that apply to some methods only (the others: to every method).
VARIANT_METHODS = {"sdpa off": {"atme", "ddgan"}, "fused_norm": FUSED_NORM_METHODS,
                   "fused_norm + bf16 + channels_last": FUSED_NORM_METHODS}

# In the order they run: when the budget runs short, the rows at the end are skipped. The
# compiled rows come last: a compiled ATME row takes about 200 s (its compilation), more than
# the full profile's section, and bench/step_profile.py measures them in a call of their own.
FULL_RESIDENT_ROWS = (
    Row("fp32 eager", ALL_OFF),
    Row("bf16 eager", BF16_EAGER),
    Row("bf16 eager - fused Adam", {**BF16_EAGER, "fused_adam": False}),
    Row("bf16 eager + channels_last", {**BF16_EAGER, "channels_last": True}),
    Row("bf16 eager + cudnn_benchmark", {**BF16_EAGER, "cudnn_benchmark": True}),
    Row("bf16 eager - sdpa", {**BF16_EAGER, "sdpa": False}),
    FUSED_NORM_EAGER,
    FUSED_NORM_CHANNELS_LAST,
    LEANEST_EAGER,
    Row(SHIPPED, None),
    Row("compiled", COMPILED),
    Row("compiled + channels_last", {**COMPILED, "channels_last": True}),
    Row("compiled + CUDA graphs", {**COMPILED, "cuda_graphs": True}),
    Row("compiled + activation checkpointing", {**COMPILED, "activation_checkpointing": True}),
)
# pix2pix: the whole loop right after its resident bf16 eager row; no attention, no group norm.
FULL_PIX2PIX_ROWS = (
    *FULL_RESIDENT_ROWS[:2], Row("bf16 eager", BF16_EAGER, "loader"),
    *(row for row in FULL_RESIDENT_ROWS[2:] if row.variant not in DDPM_UNET_ONLY_ROWS),
)
# (the row with the switch, the same row without it) for "what each switch buys"
SWITCH_COMPARISONS = (
    ("bf16 eager", "fp32 eager"), ("bf16 eager", "bf16 eager - fused Adam"),
    ("bf16 eager + channels_last", "bf16 eager"), ("bf16 eager + cudnn_benchmark", "bf16 eager"),
    ("bf16 eager", "bf16 eager - sdpa"), (FUSED_NORM_EAGER.variant, "bf16 eager"),
    (FUSED_NORM_CHANNELS_LAST.variant, FUSED_NORM_EAGER.variant), ("bf16 eager + activation checkpointing", "bf16 eager"),
    ("compiled", "bf16 eager"), ("compiled + channels_last", "compiled"), ("compiled + CUDA graphs", "compiled"),
    ("compiled + activation checkpointing", "compiled"), (SHIPPED, "fp32 eager"),
    # the short profile's fused rows against what ships (it has no plain bf16 eager row)
    (FUSED_NORM_EAGER.variant, SHIPPED), (FUSED_NORM_CHANNELS_LAST.variant, SHIPPED),
    ("bf16 eager + activation checkpointing", SHIPPED),
)

# The cheap eager switches first: compiling runs take the rest of the section's time.
CORRECTNESS_VARIANTS: list[tuple[str, dict | None, float]] = [
    ("bf16", {**ALL_OFF, "autocast": "bf16"}, TOLERANCE_BF16),
    ("channels_last", {**ALL_OFF, "channels_last": True}, TOLERANCE_FP32),
    ("fused_adam", {**ALL_OFF, "fused_adam": True}, TOLERANCE_FP32),
    ("sdpa off", {**ALL_OFF, "sdpa": False}, TOLERANCE_FP32),
    ("fused_norm", {**ALL_OFF, "fused_norm": True}, TOLERANCE_FP32),
    ("fused_norm + bf16 + channels_last", {**ALL_OFF, "fused_norm": True, "autocast": "bf16", "channels_last": True},
     TOLERANCE_BF16),
    ("activation_checkpointing", {**ALL_OFF, "activation_checkpointing": True}, TOLERANCE_FP32),
    ("compile", {**ALL_OFF, "compile": True}, TOLERANCE_FP32),
    ("all on", {**ALL_ON, "activation_checkpointing": True}, TOLERANCE_BF16),
    ("cuda_graphs", {**ALL_OFF, "compile": True, "cuda_graphs": True}, TOLERANCE_FP32),
    (SHIPPED, None, TOLERANCE_BF16),  # auto turns bf16 on with CUDA
]
CORRECTNESS_METHODS = ("pix2pix", "atme", "diffusion_gan", "ddgan")


@dataclass(frozen=True)
class Section:
    """One step of a profile, run in a process of its own."""

    name: str  # in the report and for --sections
    kind: str  # environment | decode | throughput | cuda_tests | correctness
    caps_s: tuple[float, float]  # the most seconds it may take: on a GPU, in --cpu mode
    method: str = ""  # throughput: the method measured
    rows: tuple[Row, ...] = ()  # throughput: its rows, in order


@dataclass(frozen=True)
class Profile:
    """Which sections run in which order, and how much each measures."""

    name: str
    budget_s: float  # the default --budget-s on a GPU
    sections: tuple[Section, ...]
    correctness_variants: tuple[str, ...]  # from CORRECTNESS_VARIANTS, in that list's order
    correctness_steps: tuple[int, int]  # on a GPU, in --cpu mode
    export_every_method: bool  # False: pix2pix's export only
    decode_every_batch: bool  # False: the loader at the largest batch only
    cuda_test_marks: str  # the pytest -m expression of the cuda_tests section
    notes: tuple[str, ...] = ()


FULL = Profile(
    name="full", budget_s=455.0,
    sections=(
        Section("environment", "environment", (15, 20)),
        Section("decode", "decode", (65, 20)),
        Section("throughput_pix2pix", "throughput", (75, 30), "pix2pix", FULL_PIX2PIX_ROWS),
        Section("throughput_atme", "throughput", (130, 30), "atme", FULL_RESIDENT_ROWS),
        Section("cuda_tests", "cuda_tests", (60, 40)),
        Section("correctness", "correctness", (105, 60)),
    ),
    correctness_variants=tuple(name for name, _, _ in CORRECTNESS_VARIANTS),
    correctness_steps=(20, 3), export_every_method=True, decode_every_batch=True, cuda_test_marks="cuda",
)
SHORT = Profile(
    name="short", budget_s=180.0,
    sections=(
        Section("environment", "environment", (10, 20)),
        Section("throughput_atme", "throughput", (60, 30), "atme",
                (Row(SHIPPED, None), FUSED_NORM_CHANNELS_LAST, FUSED_NORM_EAGER, LEANEST_EAGER)),
        Section("throughput_pix2pix", "throughput", (30, 30), "pix2pix", (Row(SHIPPED, None), Row(SHIPPED, None, "loader"))),
        Section("decode", "decode", (15, 20)),
        Section("correctness", "correctness", (70, 60)),
        Section("atme_fp32_baseline", "throughput", (25, 30), "atme", (Row("fp32 eager", ALL_OFF),)),
        Section("cuda_tests", "cuda_tests", (60, 40)),
    ),
    correctness_variants=("fused_norm", SHIPPED), correctness_steps=(8, 3), export_every_method=False, decode_every_batch=False,
    cuda_test_marks="cuda and not compiles",
    notes=("no compile, no CUDA graphs: a first compiled step costs tens of seconds per compiled network, more than "
           "the items after it together; the full profile measures them (--profile full --sections throughput_atme)",),
)
PROFILES = {profile.name: profile for profile in (FULL, SHORT)}


@dataclass(frozen=True)
class Scale:
    """Sizes of one mode: the GPU figures, or the same code small enough for CI on 2 cores."""

    image_size: int
    # merged into each method's reference preset `method:` block (the CPU mode's networks are narrow)
    network_overrides: dict[str, dict]
    pix2pix_batch: int
    atme_batch: int
    warmup_steps: int
    timed_steps: dict[str, int]
    loader_steps: int
    decode_batches: tuple[int, ...]
    decode_epochs: int
    repeat: int  # copies of each source pair in the shards (long epochs)
    synthetic_pairs: int
    correctness_size: int
    correctness_batch: int
    # seconds an item is expected to take, by kind (throughput rows: by method too), the start of a
    # section's process excluded: an item is skipped when its section has less left
    estimates_s: dict[str, float]
    # the rows and correctness variants run (None: all); the CPU mode runs a few, which exercise every code path
    throughput_variants: tuple[str, ...] | None = None
    correctness_variants: tuple[str, ...] | None = None


GPU = Scale(
    image_size=256, network_overrides={}, pix2pix_batch=48, atme_batch=32, warmup_steps=3,
    timed_steps={"pix2pix": 20, "atme": 10}, loader_steps=60, decode_batches=(32, 128), decode_epochs=3,
    repeat=8, synthetic_pairs=FACADES_PAIRS, correctness_size=64, correctness_batch=4,
    estimates_s={"decode": 10, "prepare": 12, "eager_row_pix2pix": 6, "eager_row_atme": 12, "compile_row_pix2pix": 50,
                 "compile_row_atme": 200, "loader_row": 8, "baseline": 6, "export": 12, "correctness": 5,
                 "correctness_compile": 25, "pytest": 20},
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
    repeat=1, synthetic_pairs=12, correctness_size=32, correctness_batch=2,
    estimates_s={"decode": 2, "prepare": 2, "eager_row_pix2pix": 2, "eager_row_atme": 2, "compile_row_pix2pix": 2,
                 "compile_row_atme": 2, "loader_row": 3, "baseline": 2, "export": 8, "correctness": 2,
                 "correctness_compile": 2, "pytest": 10},
    throughput_variants=("fp32 eager", "bf16 eager", "bf16 eager + channels_last", FUSED_NORM_CHANNELS_LAST.variant,
                         LEANEST_EAGER.variant, SHIPPED),
    correctness_variants=("bf16", "channels_last", "sdpa off", "fused_norm", "fused_norm + bf16 + channels_last", "all on",
                          SHIPPED),
)


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


# ---------------------------------------------------------------- data: a source folder, prepared


def facades_files(folder: Path) -> list[Path]:
    train = folder / "train"
    files = sorted((train if train.is_dir() else folder).glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no .jpg files in {folder} or {train}")
    return files


def write_synthetic_facade(number: int, path: Path) -> None:
    """A photo-like smooth field | its quantised 'label map', 512 x 256 like a facades file."""
    rng = np.random.default_rng(number)
    coarse = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    photo = np.asarray(coarse.resize((256, 256), Image.BICUBIC)).astype(np.int16)
    photo = np.clip(photo + rng.integers(-20, 21, size=photo.shape), 0, 255).astype(np.uint8)
    labels = (photo // 64 * 85).astype(np.uint8)
    Image.fromarray(np.concatenate([photo, labels], axis=1)).save(path, format="JPEG", quality=95)


def write_source_folder(args: argparse.Namespace, scale: Scale, folder: Path) -> str:
    """A pix2pix-layout folder (train/ only) of facades files, or synthetic ones where --facades
    is not given or cannot be read, each repeated `scale.repeat` times under other names as
    symbolic links inside the folder. Returns what it holds, for the report."""
    train = folder / "train"
    train.mkdir(parents=True)
    count = FACADES_PAIRS if not args.cpu else scale.synthetic_pairs
    names: list[str] = []
    origin = ""
    if args.facades is not None:
        try:
            for path in facades_files(args.facades)[:count]:
                shutil.copyfile(path, train / path.name)
                names.append(path.name)
            origin = f"facades ({len(names)} pairs from {args.facades})"
        except OSError as error:  # the run goes on with synthetic pairs, and says so
            for name in names:
                (train / name).unlink()
            names = []
            origin = f"FACADES NOT USED ({error_text(error)}): "
    if not names:
        names = [f"synthetic{number:04d}.jpg" for number in range(scale.synthetic_pairs)]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda number: write_synthetic_facade(number, train / names[number]), range(len(names))))
        origin += f"synthetic 512x256 JPEG pairs ({len(names)}); pass --facades DIR for the real set"
    for copy in range(1, scale.repeat):
        for name in names:
            (train / f"copy{copy}_{name}").symlink_to(name)
    return origin


def prepare_data(args: argparse.Namespace, scale: Scale, scratch: Path) -> dict:
    """The source folder, prepared by the project's writer; what was used goes into the report."""
    import workloads

    from components.data.manifest import load_manifest

    started = time.perf_counter()
    origin = write_source_folder(args, scale, scratch / "source")
    # every pair in train: the check reads no other split
    prepared = workloads.prepare_pix2pix_folder(scratch / "source", scratch / "prepared", scale.image_size,
                                                {"val_fraction": 0.0})
    train = load_manifest(prepared).split("train")
    shard_bytes = sum((prepared / shard.tar).stat().st_size for shard in train.shards)
    return {
        "folder": str(prepared), "origin": origin, "pairs": train.count, "repeat": scale.repeat,
        "mean_kib_per_image": round(shard_bytes / (2 * train.count) / 1024, 1),
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
    profile: Profile
    section: Section
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


def loader_params(context: Context, backend: str):
    """The loader params of every loader here: the shard cache of this run, one decode thread per core."""
    import workloads

    return workloads.loader_params({"backend": backend, "num_threads": os.cpu_count() or 1,
                                    "cache_dir": str(context.prepared.parent / "shard-cache")})


def open_loader(context: Context, batch_size: int, train: bool = True, backend: str = "nvjpeg",
                prepared: Path | None = None):
    """The product's loader over the prepared shards (`prepared`, else the check's data set):
    nvJPEG on the GPU; in --cpu mode the same loader class with Pillow decoding (torchvision is
    not installed next to the CPU torch)."""
    from components.data.loaders import make_loader

    prepared = prepared or context.prepared
    params = loader_params(context, backend)
    if context.args.cpu and backend == "nvjpeg":
        return pillow_nvjpeg_loader(prepared, params, batch_size, train, context.device)
    return make_loader(prepared, "train", params, batch_size, train=train, device=context.device)


def pillow_nvjpeg_loader(prepared: Path, params, batch_size: int, train: bool, device):
    """The nvjpeg loader with Pillow decoding, built as make_loader builds it: over the shards of
    the train split, verified against the manifest and pinned in the shard cache."""
    from components.data.loaders import owned_indices, shard_cache, verified_shards
    from components.data.manifest import load_manifest
    from components.data.nvjpeg_loader import NvjpegPairLoader, pil_decode

    manifest = load_manifest(prepared)
    owned = owned_indices(manifest.split("train").count, 0, 1)
    shards, pin = verified_shards(manifest, "train", owned, shard_cache(params))
    return NvjpegPairLoader(manifest, "train", shards, pin, params, batch_size, train, 0, 1, 0, device, pil_decode)


def shard_files(prepared: Path) -> list[Path]:
    return sorted((prepared / "train").glob("train-*.tar"))


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
            "importable": {name: importable(name) for name in ("torchvision", "triton", "pydantic", "nvidia.dali", "ray",
                                                               "mlflow", "webdataset", "dvc", "boto3", "botocore")},
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

    device, scale = context.device, context.scale

    def loader_rate(batch_size: int, backend: str, prepared: Path | None = None) -> dict:
        loader = open_loader(context, batch_size, backend=backend, prepared=prepared)
        for _ in loader:  # warm-up epoch: threads, decoder handles, kernels, page cache
            pass
        pairs, started = 0, time.perf_counter()
        for _ in range(scale.decode_epochs):
            for batch in loader:
                pairs += batch["source"].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        return {"pairs_per_s": round(pairs / seconds, 1), "pairs": pairs, "batch_size": batch_size,
                "backend": loader.backend, "decoder": "Pillow (CPU stand-in)" if context.args.cpu else backend,
                **shard_format(Path(loader.manifest.location))}  # the data set the loader read

    batches = scale.decode_batches if context.profile.decode_every_batch else scale.decode_batches[-1:]
    for batch_size in batches:
        record.attempt(f"nvjpeg loader, batch {batch_size}", scale.estimates_s["decode"],
                       lambda batch_size=batch_size: loader_rate(batch_size, "nvjpeg"))
    if not context.profile.decode_every_batch:
        record.note(f"the {context.profile.name} profile times the loader at batch {batches[0]} only")
        return

    def in_memory_rate(batch_size: int, prepared: Path) -> dict:
        """nvJPEG decode + the same augmentation on bytes already in memory: the loader's ceiling."""
        from components.data.nvjpeg_loader import augmentation_draws, nvjpeg_decode, pil_decode, resize_crop_flip

        blobs: dict[str, list[torch.Tensor]] = {"src.jpg": [], "tgt.jpg": []}
        for path in shard_files(prepared):
            with tarfile.open(path) as tar:
                for member in tar:
                    suffix = member.name.partition(".")[2]
                    if suffix in blobs:
                        blobs[suffix].append(torch.frombuffer(bytearray(tar.extractfile(member).read()), dtype=torch.uint8))
        decode = pil_decode if context.args.cpu else nvjpeg_decode
        crop = scale.image_size
        load = loader_params(context, "nvjpeg").load_size_for(crop)
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
        pairs = sum(one_pass(epoch) for epoch in range(1, 1 + scale.decode_epochs))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"pairs_per_s": round(pairs / (time.perf_counter() - started), 1), "pairs": pairs, "batch_size": batch_size,
                **shard_format(prepared)}

    last = scale.decode_batches[-1]
    record.attempt(f"nvJPEG + augmentation on bytes in memory, batch {last}", scale.estimates_s["decode"],
                   lambda: in_memory_rate(last, context.prepared))

    # The same source prepared again with 4:2:0 chroma (params jpeg_chroma): the photos only,
    # then both sides as the facades files themselves store them; whether a shard format
    # reaches the decode goal (docs/benchmarks.md, the loader section).
    for name, chroma in (("photos at 4:2:0", {"source": "4:4:4", "target": "4:2:0"}),
                         ("both sides at 4:2:0", {"source": "4:2:0", "target": "4:2:0"})):
        folder = context.prepared.parent / f"prepared-{chroma['source']}-{chroma['target']}".replace(":", "")
        item = record.attempt(f"prepare, {name}", scale.estimates_s["prepare"],
                              lambda folder=folder, chroma=chroma: prepare_again(context.prepared, folder, chroma))
        if item is not None and item["status"] == "ok":
            record.attempt(f"nvjpeg loader, {name}, batch {last}", scale.estimates_s["decode"],
                           lambda folder=folder: loader_rate(last, "nvjpeg", folder))

    from components.data.loaders import dali_available

    if context.args.cpu:
        record.note("DALI not measured in --cpu mode (the GPU figure is DALI's `mixed` decoding)")
    elif not dali_available():
        record.note("DALI mixed decoding not measured: nvidia.dali is not installed here")
    else:
        record.attempt("dali loader (mixed decoding), batch 128", scale.estimates_s["decode"],
                       lambda: loader_rate(128, "dali"))


def prepare_again(prepared: Path, out: Path, jpeg_chroma: dict[str, str]) -> dict:
    """The source of the prepared data set `prepared` (as its manifest records it) prepared
    again into `out` with another chroma subsampling, the rest of its params the same."""
    import workloads

    from components.data.manifest import load_manifest

    used = load_manifest(prepared).params
    workloads.prepare_pix2pix_folder(Path(used["source"]["path"]), out, used["image_size"],
                                     {"val_fraction": used["val_fraction"], "jpeg_chroma": jpeg_chroma})
    return {"pairs": load_manifest(out).split("train").count, **shard_format(out)}


def shard_format(prepared: Path) -> dict:
    """What a decoder reads from a prepared data set: each side's chroma subsampling, as the
    first pair's JPEGs say, and the JPEG bytes per pair (tar headers and padding left out)."""
    from PIL import JpegImagePlugin

    from components.data.manifest import load_manifest

    train = load_manifest(prepared).split("train")
    with tarfile.open(prepared / train.shards[0].tar) as tar:
        first = {member.name.partition(".")[2]: tar.extractfile(member).read() for member in tar if member.isfile()}
    names = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
    source, target = (names.get(JpegImagePlugin.get_sampling(Image.open(io.BytesIO(first[side]))), "unknown")
                      for side in ("src.jpg", "tgt.jpg"))
    jpeg_bytes = 0
    for shard in train.shards:
        with tarfile.open(prepared / shard.tar) as tar:
            jpeg_bytes += sum(member.size for member in tar if member.name.endswith((".src.jpg", ".tgt.jpg")))
    return {"chroma": f"source {source}, target {target}", "jpeg_bytes_per_pair": round(jpeg_bytes / train.count)}


def resident_batch(context: Context, batch_size: int) -> tuple[dict, str]:
    """One real batch from the loader, kept on the device; a synthetic one if the loader fails."""
    import workloads

    try:
        batches = iter(open_loader(context, batch_size))
        batch = next(batches)
        batches.close()  # stops the loader's threads
        return {key: value.to(context.device) for key, value in batch.items()}, "first batch of the nvjpeg loader"
    except Exception as error:
        batch = workloads.random_batch(batch_size, context.scale.image_size, context.dataset_size, context.device)
        return batch, f"synthetic (loader failed: {error_text(error)})"


def section_throughput(context: Context, record: SectionRecord) -> None:
    import torch
    import workloads

    from components.training.loop import TrainingSession

    device, scale, method = context.device, context.scale, context.section.method
    batch_size = scale.pix2pix_batch if method == "pix2pix" else scale.atme_batch
    model = workloads.model_params(method, scale.image_size, scale.network_overrides.get(method))
    batch, origin = resident_batch(context, batch_size)
    record.note(f"{method}: batch {batch_size} at {scale.image_size} px, resident batch: {origin}")
    steps = scale.timed_steps[method]
    found: dict = {"flops": None, "peak": workloads.peak_tflops(device)}

    def run(row: Row, overrides: dict | None) -> dict:
        workloads.release_device(device)
        before = workloads.compile_counts()
        session = TrainingSession(model, workloads.train_params(batch_size, overrides), context.dataset_size, device)
        batches = itertools.repeat(batch) if row.mode == "resident" else workloads.endless(open_loader(context, batch_size))
        warmup_s, _ = workloads.time_steps(session, batches, scale.warmup_steps, device)
        if found["flops"] is None and not session.switches.compile:
            found["flops"] = workloads.flops_per_image(session, batch, batch_size)
        timed = steps if row.mode == "resident" else scale.loader_steps
        seconds, images = workloads.time_steps(session, batches, timed, device)
        rate = images / seconds
        finite = all(bool(torch.isfinite(value)) for value in session.stats.step_values.values())
        peak_gib = workloads.peak_memory_gib(device)
        flops, peak = found["flops"], found["peak"]
        result = {
            "method": method, "variant": row.variant, "mode": row.mode, "batch_size": batch_size,
            "image_size": scale.image_size,
            "images_per_s": round(rate, 1), "step_ms": round(1000 * seconds / timed, 2),
            "warmup_s": round(warmup_s, 1), "compile_s": round(max(warmup_s - scale.warmup_steps * seconds / timed, 0), 1),
            "peak_memory_gib": round(peak_gib, 2), "gib_per_image": round(peak_gib / batch_size, 3),
            "train_gflop_per_image": round(flops / 1e9, 3) if flops else None,
            "achieved_tflops": round(flops * rate / 1e12, 1) if flops else None,
            "mfu": round(flops * rate / (peak * 1e12), 4) if flops and peak else None,
            # as the profile asks (null: the shipped params), and as they resolved on this device
            "requested": row.switches, "losses_finite": finite, "switches": session.switches.summary(),
            # graphs, graph breaks, frames left eager, compile cache hits and misses: empty when nothing compiled
            "compiled": workloads.compiled_since(before),
        }
        if not finite:
            result["status"] = "failed"
            result["error"] = "a loss is not finite: " + ", ".join(
                f"{key}={float(value):.4g}" for key, value in session.stats.step_values.items())
        del session, batches
        return result

    resident_rates: dict[str, float] = {}
    seen: dict[str, str] = {}
    for row in context.section.rows:
        if scale.throughput_variants is not None and row.variant not in scale.throughput_variants:
            continue
        overrides = switches_for(context, row.switches)
        key = json.dumps([overrides, row.mode], sort_keys=True)
        if key in seen:
            record.note(f"{method} {row.mode} {row.variant}: same switches as '{seen[key]}' in this mode, not repeated")
            continue
        seen[key] = row.variant
        compiles = overrides is not None and overrides.get("compile")
        cost = scale.estimates_s[f"{'compile' if compiles else 'eager'}_row_{method}"]
        if row.mode == "loader":
            cost += scale.estimates_s["loader_row"]
        item = record.attempt(f"{method} {row.mode} {row.variant}", cost, lambda row=row, overrides=overrides: run(row, overrides))
        if item is None or item["status"] != "ok":
            continue
        if row.mode == "resident":
            resident_rates[row.variant] = item["images_per_s"]
        elif resident_rates.get(row.variant):
            item["fraction_of_resident"] = round(item["images_per_s"] / resident_rates[row.variant], 3)
            record.save()


@dataclass
class CorrectnessRun:
    """A correctness run: its session, each step's statistics, the generator's last output of
    each step and (a free run) the state before each step."""

    session: object  # TrainingSession, imported in the section's process only
    curve: dict[str, list[float]] = field(default_factory=dict)
    outputs: list = field(default_factory=list)
    states: list[dict] = field(default_factory=list)


def relative_difference(actual, expected) -> float:
    """||actual - expected|| / ||expected|| (L2 over the whole tensor)."""
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-12))


def host_copy(state):
    """A copy of a training state (nested dicts, lists, tensors, numbers) in host memory.

    The states before every step of a run are kept off the device. Each load takes a fresh
    copy too: a loaded optimiser keeps the tensors it is given where they already sit on the
    right device (Adam's step counts stay on the host), and its steps would then change the
    kept state."""
    import torch

    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: host_copy(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(host_copy(value) for value in state)
    return state


def curve_deviation(curve: dict[str, list[float]], reference: dict[str, list[float]]) -> dict[str, float]:
    return {
        name: max(abs(value - base) / max(abs(base), LOSS_FLOOR) for value, base in zip(curve[name], reference[name]))
        for name in CURVE_LOSSES if name in reference and name in curve
    }


def section_correctness(context: Context, record: SectionRecord) -> None:
    import torch
    import workloads

    from components.config import with_overrides
    from components.data.batch import Batch
    from components.methods.base import unwrap
    from components.training.loop import TrainingSession

    device, scale, profile = context.device, context.scale, context.profile
    size, batch_size = scale.correctness_size, scale.correctness_batch
    steps = profile.correctness_steps[1 if context.args.cpu else 0]
    # Dropout off: compiled code and CUDA graphs draw other random numbers than eager, and
    # dropout masks would then differ between the runs compared.
    no_dropout = {"generator": {"dropout": 0.0}}
    changed_blocks = {"pix2pix": with_overrides(no_dropout, SHIPPED_PIX2PIX_NORMS), "diffusion_gan": no_dropout}
    models = {method: workloads.model_params(method, size, with_overrides(scale.network_overrides.get(method, {}),
                                                                          changed_blocks.get(method, {})))
              for method in CORRECTNESS_METHODS}
    generator = torch.Generator().manual_seed(0)
    count = 4 * batch_size
    sources = torch.rand(count, 3, size, size, generator=generator) * 2 - 1
    targets = (0.8 * sources[:, [2, 0, 1]] - 0.1).clamp(-1, 1)  # a learnable colour transform
    batches: list[Batch] = []
    for step in range(steps):
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % count
        batches.append({"source": sources[rows], "target": targets[rows], "index": rows,
                        "flip": torch.zeros(batch_size, dtype=torch.bool), "crop": torch.zeros(batch_size, 2, dtype=torch.int64)})
    record.note(f"{len(CORRECTNESS_METHODS)} methods at {size} px (pix2pix with the shipped model's instance norms), "
                f"batch {batch_size}, {steps} steps, each switched step "
                f"from the fp32 run's state before it; tolerance {TOLERANCE_FP32:.0%} (fp32 switches) / "
                f"{TOLERANCE_BF16:.0%} (bf16) of the fp32 losses, export {EXPORT_TOLERANCE}")

    def train(method: str, overrides: dict | None, reference: CorrectnessRun | None = None) -> CorrectnessRun:
        """Train on `batches`: freely, keeping the state before each step, or each step from the
        `reference` run's state before it."""
        session = TrainingSession(models[method], workloads.train_params(batch_size, overrides), count, device)
        run = CorrectnessRun(session)
        generator = unwrap(session.method.networks()["G"])
        last_output: list[torch.Tensor] = []
        hook = generator.register_forward_hook(lambda module, inputs, output: last_output.append(output.detach()))
        for step, batch in enumerate(batches):
            if reference is None:
                run.states.append(host_copy(session.state_dict()))
            else:
                session.load_state_dict(host_copy(reference.states[step]))
            last_output.clear()
            session.train_step(batch)
            run.outputs.append(last_output[-1].float().cpu())
            for name, value in session.stats.step_values.items():
                run.curve.setdefault(name, []).append(float(value))
        hook.remove()
        return run

    references: dict[str, CorrectnessRun] = {}
    # torch.export traces every op in Python: a U-Net's export takes ~20 s on two busy cores
    export_methods = CORRECTNESS_METHODS if profile.export_every_method and not context.args.cpu else ("pix2pix",)
    if export_methods != CORRECTNESS_METHODS:
        record.note("the export check runs for pix2pix only" + (" in --cpu mode" if profile.export_every_method else ""))
    for method in CORRECTNESS_METHODS:
        def baseline(method: str = method) -> dict:
            workloads.release_device(device, forget_compiled=False)
            run = references[method] = train(method, ALL_OFF)
            session, curve = run.session, run.curve
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
        if variant not in profile.correctness_variants:
            continue
        if scale.correctness_variants is not None and variant not in scale.correctness_variants:
            continue
        overrides = switches_for(context, overrides)
        for method in CORRECTNESS_METHODS:
            if method not in VARIANT_METHODS.get(variant, CORRECTNESS_METHODS):
                continue
            if method not in references:
                record.data["items"].append({"name": f"{method} {variant}", "status": "skipped",
                                             "reason": "no fp32 eager curve to compare with"})
                continue

            def compare(method: str = method, overrides: dict | None = overrides, tolerance: float = tolerance,
                        variant: str = variant) -> dict:
                # compiled blocks stay cached across methods of the same shapes: compile time is not measured here
                workloads.release_device(device, forget_compiled=False)
                run = train(method, overrides, references[method])
                deviation = curve_deviation(run.curve, references[method].curve)
                output_deviation = max(relative_difference(output, expected)
                                       for output, expected in zip(run.outputs, references[method].outputs))
                finite = all(math.isfinite(value) for values in run.curve.values() for value in values)
                worst = max(*deviation.values(), output_deviation)
                return {"method": method, "variant": variant, "losses_finite": finite, "tolerance": tolerance,
                        "switches": run.session.switches.summary(),
                        "max_relative_deviation": {name: round(value, 5) for name, value in deviation.items()},
                        "generator_output_deviation": round(output_deviation, 5),
                        "status": "ok" if finite and worst <= tolerance else "failed"}

            compiles = overrides is not None and overrides.get("compile")
            record.attempt(f"{method} {variant}", scale.estimates_s["correctness_compile" if compiles else "correctness"],
                           compare)
    if context.args.cpu:
        record.note("--cpu: no compile, no CUDA graphs (the GPU run covers them), switches "
                    + ", ".join(name for name in profile.correctness_variants if name in (scale.correctness_variants or ())))


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


def pytest_collected(output: str) -> int | None:
    """How many tests `pytest -v` selected, from its "collecting ... collected N items / M deselected /
    K selected" line."""
    for line in output.splitlines():
        _, found, counted = line.partition("collected ")
        if found:
            counts = {label: int(number) for number, label in re.findall(r"(\d+) (\w+)", counted)}
            return counts.get("selected", counts.get("items", counts.get("item")))
    return None


def pytest_outcomes(output: str) -> dict[str, str]:
    """test id -> PASSED, FAILED, ERROR or SKIPPED, from `pytest -v` lines (complete or not)."""
    outcomes = {}
    for line in output.splitlines():
        parts = line.split(" ")
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            outcomes[parts[0]] = parts[1]
    return outcomes


def pytest_result(output: str, finished: bool, returncode: int | None, marks: str) -> dict:
    """The cuda_tests item from a `pytest -v` run's output, complete or cut at the time budget:
    failed if a test failed (or pytest could not run them); partial if every test that ran
    passed but the budget ended the run."""
    outcomes = pytest_outcomes(output)
    counts = {name: sum(1 for value in outcomes.values() if value == outcome)
              for name, outcome in (("passed", "PASSED"), ("failed", "FAILED"), ("errors", "ERROR"), ("skipped", "SKIPPED"))}
    failed = sorted(test for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR"))
    collected = pytest_collected(output)
    result = {"marks": marks, "tests": len(outcomes), "collected": collected, **counts, "failed_tests": failed,
              "finished": finished, "returncode": returncode}
    if failed or (finished and returncode not in (0, 5)):  # 5: no test selected
        result["status"] = "failed"
        result["error"] = f"{len(failed)} failed: {', '.join(failed)}" if failed else f"pytest exited {returncode}"
    elif not finished:
        result["status"] = "partial"
        result["reason"] = f"time budget: {len(outcomes)} of {collected if collected is not None else '?'} tests ran"
    if "status" in result:
        result["output_tail"] = output[-4000:]
    return result


def section_cuda_tests(context: Context, record: SectionRecord) -> None:
    marks = context.profile.cuda_test_marks

    def run_pytest() -> dict:
        command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", marks, *CUDA_TEST_FILES]
        left = max(record.time_left() - 5, 10)
        try:
            completed = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, timeout=left)
            return pytest_result(completed.stdout, True, completed.returncode, marks)
        except subprocess.TimeoutExpired as timeout:  # what ran so far still counts
            output = timeout.stdout.decode(errors="replace") if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
            return pytest_result(output, False, None, marks)

    record.attempt(f"pytest -m '{marks}'", context.scale.estimates_s["pytest"], run_pytest)


SECTION_FUNCTIONS: dict[str, Callable[[Context, SectionRecord], None]] = {
    "environment": section_environment,
    "decode": section_decode,
    "throughput": section_throughput,
    "cuda_tests": section_cuda_tests,
    "correctness": section_correctness,
}


def run_section(args: argparse.Namespace) -> int:
    scale = CPU if args.cpu else GPU
    profile = PROFILES[args.profile]
    section = next(section for section in profile.sections if section.name == args.section)
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
    context = Context(args, scale, profile, section, prepared, dataset_size)
    if section.kind == "decode" and prepared is None:
        record.note("no prepared shards (see the data error in the report): nothing to decode")
        return 0
    try:
        SECTION_FUNCTIONS[section.kind](context, record)
    except Exception as error:  # outside any item: the section could not go on
        record.data["error"] = error_text(error)
        record.data["traceback"] = traceback.format_exc(limit=8)[-3000:]
        record.save()
        log(f"section {section.name} stopped: {record.data['error']}")
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
    if "chroma" in item:
        parts.append(f"{item['chroma']}, {item['jpeg_bytes_per_pair']:,} JPEG bytes/pair")
    if "max_relative_deviation" in item:
        worst = max(item["max_relative_deviation"].values(), default=0.0)
        parts.append(f"losses {worst:.2%}, G output {item['generator_output_deviation']:.2%} "
                     f"(tolerance {item['tolerance']:.0%})")
    if "export_max_abs_difference" in item:
        parts.append(f"export |diff| {item['export_max_abs_difference']:.2e}")
    if "tests" in item:
        parts.append(f"{item['passed']} passed, {item['failed'] + item['errors']} failed, {item['skipped']} skipped"
                     + (f", {item['reason']}" if item.get("status") == "partial" else ""))
    if item.get("losses_finite") is False:
        parts.append("NON-FINITE LOSS")
    return ", ".join(parts)


def throughput_rows(report: dict, method: str, mode: str = "resident") -> list[dict]:
    """The measured rows of `method` in `mode`, whichever section measured them."""
    return [item for section in report["sections"].values() for item in section.get("items", [])
            if item.get("status") == "ok" and item.get("method") == method and item.get("mode") == mode
            and "images_per_s" in item]


def best_row(report: dict, method: str, mode: str = "resident") -> dict | None:
    return max(throughput_rows(report, method, mode), key=lambda row: row["images_per_s"], default=None)


def row_named(report: dict, method: str, variant: str) -> dict | None:
    return next((row for row in throughput_rows(report, method) if row["variant"] == variant), None)


def target_lines(report: dict) -> list[str]:
    """Each target of the issue against the best measured row."""
    lines = []

    def verdict(value: float | None, target: float, higher: bool) -> str:
        if value is None:
            return "not measured"
        return "met" if (value >= target if higher else value <= target) else "NOT met"

    atme = best_row(report, "atme")
    lines.append(f"ATME >= {TARGETS['atme_images_per_s']:.0f} img/s at batch 32: "
                 f"{atme['images_per_s'] if atme else None} ({atme['variant'] if atme else '-'}): "
                 f"{verdict(atme and atme['images_per_s'], TARGETS['atme_images_per_s'], True)}")
    leanest = min(throughput_rows(report, "atme"), key=lambda row: row["gib_per_image"], default=None)
    lines.append(f"ATME <= {TARGETS['atme_gib_per_image']} GiB per image: "
                 f"{atme['gib_per_image'] if atme else None} at the fastest, "
                 f"{leanest['gib_per_image'] if leanest else None} at the leanest ({leanest['variant'] if leanest else '-'}): "
                 f"{verdict(atme and atme['gib_per_image'], TARGETS['atme_gib_per_image'], False)} at the fastest")
    pix2pix = best_row(report, "pix2pix")
    lines.append(f"pix2pix resident >= {TARGETS['pix2pix_resident_images_per_s']:.0f} img/s at batch 48: "
                 f"{pix2pix['images_per_s'] if pix2pix else None} ({pix2pix['variant'] if pix2pix else '-'}): "
                 f"{verdict(pix2pix and pix2pix['images_per_s'], TARGETS['pix2pix_resident_images_per_s'], True)}")
    loaded = best_row(report, "pix2pix", "loader")
    fraction = loaded.get("fraction_of_resident") if loaded else None
    lines.append(f"pix2pix whole loop >= {TARGETS['pix2pix_loader_fraction']:.0%} of resident: {fraction}: "
                 f"{verdict(fraction, TARGETS['pix2pix_loader_fraction'], True)}")
    loaders = [item for item in report["sections"].get("decode", {}).get("items", [])
               if item.get("status") == "ok" and "loader" in item["name"]]
    fastest = max(loaders, key=lambda item: item["pairs_per_s"], default=None)
    rate = fastest["pairs_per_s"] if fastest else None
    which = f" ({fastest['name']})" if fastest else ""
    lines.append(f"decode >= {TARGETS['decode_pairs_per_s']:,.0f} pairs/s through the loader: {rate}{which}: "
                 f"{verdict(rate, TARGETS['decode_pairs_per_s'], True)}")
    return lines


def switch_difference(on: dict, off: dict) -> str:
    """What `on` turns on or changes against `off`, from the switches the rows resolved to."""
    changed = [f"{name}={value}" for name, value in on.items() if off.get(name) != value]
    return ", ".join(changed) or "the same switches"


def switch_lines(report: dict) -> list[str]:
    """What each switch buys, from the on/off rows: the evidence for the `auto` defaults."""
    lines = []
    for method in ("pix2pix", "atme"):
        for with_name, without_name in SWITCH_COMPARISONS:
            on, off = row_named(report, method, with_name), row_named(report, method, without_name)
            if on and off:
                lines.append(f"{method:8s} {with_name} vs {without_name} ({switch_difference(on['switches'], off['switches'])}): "
                             f"speed x{on['images_per_s'] / off['images_per_s']:.2f}, "
                             f"memory x{on['peak_memory_gib'] / max(off['peak_memory_gib'], 1e-9):.2f}")
    return lines


def table(report: dict) -> str:
    lines = [f"GPU check, profile {report['profile']}: {report['mode']} mode, {report.get('device', '?')}, "
             f"{report['elapsed_s']} s of {report['budget_s']} s budget",
             f"data: {report['data'].get('origin', report['data'].get('error'))}"]
    lines += [f"note: {note}" for note in report["notes"]]
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
        # partial: every test that ran passed, the rest did not fit in the budget
        if any(item.get("status") not in ("ok", "skipped", "partial") for item in section.get("items", [])):
            return True
    return False


def follow(process: subprocess.Popen, part: Path, limit_s: float, changed: Callable[[], None]) -> str:
    """Wait for a section's process, at most `limit_s`, calling `changed` whenever its part file
    changes (so the report holds each item as it finishes); returns how the section ended."""
    stop_at = time.monotonic() + limit_s
    last_seen = None
    while True:
        code = process.poll()
        stamp = (part.stat().st_ino, part.stat().st_mtime_ns) if part.exists() else None  # a rewrite is a new file
        if stamp != last_seen and code is None:
            last_seen = stamp
            changed()
        if code is not None:
            return "ok" if code == 0 else f"failed (exit status {code})"
        if time.monotonic() >= stop_at:
            process.kill()
            process.wait()
            return "killed at its time limit"
        time.sleep(0.25)


def orchestrate(args: argparse.Namespace) -> int:
    scale = CPU if args.cpu else GPU
    profile = PROFILES[args.profile]
    started = time.monotonic()
    deadline = started + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / REPORT_NAME
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "profile": profile.name,
        "mode": "cpu" if args.cpu else "gpu", "machine": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "budget_s": args.budget_s, "elapsed_s": 0.0, "notes": list(profile.notes),
        "tolerances": {"fp32_switches": TOLERANCE_FP32, "bf16": TOLERANCE_BF16, "loss_floor": LOSS_FLOOR,
                       "export_max_abs": EXPORT_TOLERANCE},
        "targets": TARGETS, "data": {}, "sections": {},
    }

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        write_json_atomic(report_path, report, sort_keys=False)

    log(f"profile {profile.name}, {report['mode']} mode, budget {args.budget_s} s, report {report_path}")
    with tempfile.TemporaryDirectory(prefix="pairgan-gpu-check-") as scratch_name:
        scratch = Path(scratch_name)
        try:
            report["data"] = prepare_data(args, scale, scratch)
            log(f"data: {report['data']['pairs']} pairs in shards ({report['data']['origin']}) in {report['data']['seconds']} s")
        except Exception as error:
            report["data"] = {"error": error_text(error)}
            log(f"data could not be prepared: {report['data']['error']}")
        save()
        for section in profile.sections:
            if section.name not in args.sections:
                continue
            left = deadline - time.monotonic()
            cap = section.caps_s[1 if args.cpu else 0]
            if left < min(15.0, cap):
                report["sections"][section.name] = {"status": "skipped", "notes": [f"time budget: {max(left, 0):.0f} s left"],
                                                    "items": []}
                log(f"section {section.name}: skipped, {max(left, 0):.0f} s of the budget left")
                save()
                continue
            allowed = min(cap, left)
            part = scratch / f"{section.name}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--profile", profile.name, "--section", section.name,
                       "--part", str(part), "--deadline", str(time.monotonic() + allowed), "--out", str(args.out)]
            if args.cpu:
                command.append("--cpu")
            if "folder" in report["data"]:
                command += ["--prepared", report["data"]["folder"]]
            log(f"section {section.name}: up to {allowed:.0f} s")
            section_started = time.monotonic()

            def merge(status: str) -> None:  # the section's part file into the report, saved
                record = json.loads(part.read_text()) if part.exists() else {"items": [], "notes": []}
                record["status"] = status
                record["wall_s"] = round(time.monotonic() - section_started, 1)
                if section.kind == "environment" and record["items"]:
                    report["device"] = record["items"][0].get("device", report["machine"])
                report["sections"][section.name] = record
                save()

            # The child skips what would not fit; this stops one whose last item overran (or hung):
            # soon after its own deadline, and never much after the whole budget's.
            status = follow(subprocess.Popen(command), part, min(allowed + 20, left + 5), lambda: merge("running"))
            merge(status)
        report["table"] = table(report)
        save()
    print(report["table"], flush=True)
    return 1 if failed(report) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {REPORT_NAME}")
    parser.add_argument("--cpu", action="store_true", help="the same code, small, on the CPU (CI)")
    parser.add_argument("--profile", choices=list(PROFILES), default=FULL.name,
                        help="full: every section and switch; short: what matters most, in order, in 180 s")
    parser.add_argument("--facades", type=Path, default=None,
                        help="facades JPEGs (photo | labels, 512x256): DIR/*.jpg or DIR/train/*.jpg; default: synthetic")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total seconds; sections and items that would not fit are skipped "
                             "(default: the profile's, 455 full, 180 short; --cpu 240)")
    parser.add_argument("--sections", nargs="+", default=None,
                        help="run only these of the profile's sections (default: all of them)")
    # internal: one section in a child process
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    names = [section.name for section in profile.sections]
    unknown = sorted(set(args.sections or []) - set(names)) + ([args.section] if args.section and args.section not in names else [])
    if unknown:
        parser.error(f"profile {profile.name} has no section {', '.join(unknown)}; its sections: {', '.join(names)}")
    args.sections = args.sections or names
    if args.budget_s is None:
        args.budget_s = 240.0 if args.cpu else profile.budget_s
    if args.section:
        return run_section(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
