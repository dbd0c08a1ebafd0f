"""Compiled code kept between training runs (params/train.yaml `performance.compile_cache`).

With `compile` on, the first training step compiles every block shape, forward and backward
(minutes for ATME's U-Net at 256 px), and the first validation compiles the sampling shapes.
Inductor keeps what it compiled in a folder of the machine (under /tmp), which a fresh
cluster node, container or CI runner does not have, so a scheduled retraining would pay
the compilation again every time. With `compile_cache` on, every worker loads PyTorch's
portable compile cache (`torch.compiler.load_cache_artifacts`: Inductor's compiled graphs
with their Triton kernels, autotuning results, AOTAutograd's graphs) from the job's storage
before its first step, and worker rank 0 writes it back (`save_cache_artifacts`) once, after
the last epoch, where it holds something new. Once: a second `save_cache_artifacts` in the same
process writes a file from which `load_cache_artifacts` takes only the second call's entries
(PyTorch 2.13: a run that saved after its first and its last epoch wrote 77 entries, and the
next run loaded 22). Inductor's own keys decide what is reused: an entry made by another
PyTorch, device or block simply misses and is compiled.

Where: `<run.storage_path>/compile-cache/<key>.bin`, a local folder or S3, beside the runs
that use it. One file per configuration (`key`: PyTorch and CUDA versions, the device, the
networks' architecture, the switches, batch and image size), because a process saves only the
entries it used: two configurations sharing one file would keep dropping each other's.
Local files are replaced atomically, S3 objects are; two runs saving at once leave one
complete file. A missing or unreadable file costs only the compilation it would have saved.

The cache is compiled code that the workers load and run: whoever can write the storage can
run code on the training machines through it (checkpoints, loaded with weights_only, cannot).
Hence off by default, for storage that only the training jobs write.
"""

import hashlib
import logging
import platform
from typing import TYPE_CHECKING

import torch

from components.methods.base import unwrap
from components.stored_folder import StoredFolder, join_location

if TYPE_CHECKING:
    from components.training.loop import TrainingSession

logger = logging.getLogger(__name__)

COMPILE_CACHE_FOLDER = "compile-cache"


def compile_cache_location(storage: str) -> str:
    """The compile caches' folder under a job's storage (an absolute local folder or s3://)."""
    return join_location(storage, COMPILE_CACHE_FOLDER)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} {platform.machine()}"


def configuration_key(networks: dict[str, torch.nn.Module], switches: dict, batch_size: int, image_size: int,
                      device: torch.device) -> str:
    """What decides the compiled code of a training job, hashed: the file name of its cache."""
    described = [
        f"torch {torch.__version__} cuda {torch.version.cuda}", device_name(device),
        repr(sorted(switches.items())), f"batch {batch_size} image {image_size}",
        *(f"{name}: {network!r}" for name, network in sorted(networks.items())),
    ]
    return hashlib.sha256("\n".join(described).encode()).hexdigest()[:20]


def _entry_count(info) -> int:
    """How many compiled entries PyTorch's cache info lists (AOTAutograd's, Inductor's, kernels')."""
    return sum(len(keys) for keys in info.artifacts.values())


class CompileCache:
    """One configuration's compile cache file: `load` before the first compilation, `save` after."""

    def __init__(self, location: str, key: str) -> None:
        self._folder, self._name = StoredFolder(location), f"{key}.bin"
        self.uri = self._folder.address(self._name)
        self._kept_digest: str | None = None  # of the bytes loaded or last saved: unchanged ones are not written

    def load(self) -> int:
        """Put the kept compiled code into this process's Inductor cache; returns how many entries."""
        try:
            data = self._folder.read_bytes(self._name)
        except OSError as error:  # S3's errors included
            logger.warning("compile cache: cannot read %s (%s); compiling from scratch", self.uri, error)
            return 0
        if data is None:
            logger.info("compile cache: none yet at %s; this run compiles and saves it", self.uri)
            return 0
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception:  # whatever PyTorch's loader meets in a damaged file, training goes on
            info = None
        if info is None:
            logger.warning("compile cache: %s is not a compile cache this PyTorch can read; compiling from scratch "
                           "(it is replaced at the end of this run)", self.uri)
            return 0
        self._kept_digest = hashlib.sha256(data).hexdigest()
        entries = _entry_count(info)
        logger.info("compile cache: %d entries (%.1f MB) loaded from %s", entries, len(data) / 1e6, self.uri)
        return entries

    def save(self) -> bool:
        """Write this process's compiled code, unless it is what the file holds; returns whether it wrote.
        Call it once per process (see the module doc). A failed write is a warning: the run goes on,
        the next one compiles again."""
        serialized = torch.compiler.save_cache_artifacts()
        if serialized is None:  # nothing compiled
            return False
        data, info = serialized
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._kept_digest:
            return False
        try:
            self._folder.write_bytes(self._name, data)
        except OSError as error:  # S3's errors included
            logger.warning("compile cache: cannot write %s (%s); the next run compiles again", self.uri, error)
            return False
        self._kept_digest = digest
        logger.info("compile cache: %d entries (%.1f MB) saved to %s", _entry_count(info), len(data) / 1e6, self.uri)
        return True


def session_compile_cache(location: str | None, session: "TrainingSession") -> CompileCache | None:
    """The compile cache of a training session: None where it compiles nothing, its params keep no
    cache (`performance.compile_cache`) or the job gives no location."""
    if location is None or not session.switches.compile or not session.train.performance.compile_cache:
        return None
    networks = {name: unwrap(network) for name, network in session.method.networks().items()}
    key = configuration_key(networks, session.switches.summary(), session.train.batch_size,
                            session.model.image_size, session.device)
    return CompileCache(location, key)
