"""The node-local shard cache: verified copies of S3 shards, and the record of which shards were verified.

Every shard a loader reads is first checked against the manifest's SHA-256, once per node
and shard:
- a shard on S3 is downloaded into the cache (a temporary name, hashed while it streams,
  renamed into place only when the checksum matches) and reused by later epochs, runs and
  the other workers of the node;
- a local shard is read where it is; the record of its verification (size and modification
  time of the file that matched) makes later runs skip the hashing until the file changes.
A cache entry whose size or modification time no longer match its record (truncated,
overwritten) is fetched again.

Concurrency: a lock per shard makes two workers that need the same shard download it once
(the second waits, then finds it); each loader pins the shards it uses (a pin file holding
their checksums, locked by its process, so the pins of a crashed process are recognised as
stale) and eviction never removes a pinned entry. Eviction removes the least recently used
entries until the cache is within its size.

Layout under the cache folder:
    shards/<sha256>.tar      verified shards downloaded from S3
    verified/<sha256>-<path hash>.json   what was verified (path, size, mtime); its mtime is the last use
    locks/<sha256>.lock      held while a shard is being fetched or evicted
    pins/<pid>-<token>.pin   the checksums a live loader uses
    tmp/                     downloads in progress
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.data.integrity import DataError, file_sha256
from components.locks import LockHeld, file_lock
from components.object_store import download_file, is_s3_uri

log = logging.getLogger(__name__)

GIB = 1 << 30


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/pairgan/shards, else ~/.cache/pairgan/shards, on the machine that calls it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pairgan" / "shards"


@dataclass(frozen=True)
class ShardSource:
    """Where one shard is and what it must hash to."""

    location: str  # a local path or an s3:// URI
    sha256: str
    diagnose: Callable[[Path, str], str]  # (file that did not match, its sha256) -> the message naming shard and sample


class Pin:
    """The shards a loader uses; eviction leaves them alone until the pin is released (or its process ends)."""

    def __init__(self, path: Path, checksums: Iterable[str]):
        self.path = path
        # Locked and written under another name, then renamed: eviction never sees a pin
        # file before its owner holds it (it would take it for the pin of a dead process).
        writing = path.with_suffix(".writing")
        self._descriptor = os.open(writing, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self._descriptor, fcntl.LOCK_EX)
        os.write(self._descriptor, "\n".join(sorted(set(checksums))).encode())
        os.rename(writing, path)
        self._finalizer = weakref.finalize(self, Pin._release, path, self._descriptor)

    @staticmethod
    def _release(path: Path, descriptor: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(descriptor)

    def release(self) -> None:
        self._finalizer()


class ShardCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        for folder in ("shards", "verified", "locks", "pins", "tmp"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        self.fetched = 0  # downloads made by this object (tests and logs)
        self.hashed = 0  # files hashed by this object

    # --- records -----------------------------------------------------------------

    def _record_path(self, sha256: str, path: Path) -> Path:
        path_hash = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        return self.root / "verified" / f"{sha256}-{path_hash}.json"

    def _is_verified(self, sha256: str, path: Path) -> bool:
        record_path = self._record_path(sha256, path)
        try:
            record = json.loads(record_path.read_text())
            stat = path.stat()
        except (OSError, ValueError):
            return False
        if record != {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
            return False
        with contextlib.suppress(OSError):
            os.utime(record_path)  # the record's mtime is the shard's last use (LRU)
        return True

    def _record(self, sha256: str, path: Path) -> None:
        stat = path.stat()
        record = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        temporary = self.root / "tmp" / f"{sha256}.{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        temporary.write_text(json.dumps(record))
        os.replace(temporary, self._record_path(sha256, path))

    # --- pins and eviction -------------------------------------------------------

    def pin(self, checksums: Iterable[str]) -> Pin:
        return Pin(self.root / "pins" / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.pin", checksums)

    def _pinned(self) -> set[str]:
        pinned: set[str] = set()
        for path in (self.root / "pins").glob("*.pin"):
            try:
                descriptor = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its loader is alive
                    pinned.update(os.pread(descriptor, 1 << 24, 0).decode().split())
                else:  # its process ended without releasing it
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            finally:
                os.close(descriptor)
        return pinned

    def evict(self) -> None:
        """Remove the least recently used unpinned entries until the cache fits in max_bytes."""
        with file_lock(self.root / "cache.lock", "shard cache eviction", wait=True):
            entries = []
            for path in (self.root / "shards").glob("*.tar"):
                sha256 = path.stem
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                record = self._record_path(sha256, path)
                last_use = record.stat().st_mtime if record.exists() else 0.0
                entries.append((last_use, sha256, path, size))
            total = sum(entry[3] for entry in entries)
            if total <= self.max_bytes:
                return
            pinned = self._pinned()
            for _, sha256, path, size in sorted(entries):
                if total <= self.max_bytes:
                    break
                if sha256 in pinned:
                    continue
                try:
                    with file_lock(self.root / "locks" / f"{sha256}.lock", "shard cache eviction"):
                        path.unlink(missing_ok=True)
                        self._record_path(sha256, path).unlink(missing_ok=True)
                except LockHeld:
                    continue  # being fetched right now: in use
                total -= size
                log.info("shard cache: evicted %s (%.1f MiB)", sha256[:12], size / (1 << 20))
            if total > self.max_bytes:
                log.warning(
                    "shard cache %s holds %.2f GiB, more than its %.2f GiB: the shards in use do not fit; "
                    "raise loader.cache_max_gib or use more workers", self.root, total / GIB, self.max_bytes / GIB,
                )

    # --- getting a verified shard ------------------------------------------------

    def verified_local(self, shard: ShardSource) -> Path:
        """A local shard, checked against its checksum (hashed only when not verified before)."""
        path = Path(shard.location)
        if self._is_verified(shard.sha256, path):
            return path
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            raise DataError(f"{path}: shard listed in the manifest is missing") from None
        self.hashed += 1
        if actual != shard.sha256:
            raise DataError(shard.diagnose(path, actual))
        self._record(shard.sha256, path)
        return path

    def fetched_copy(self, shard: ShardSource, client: Any) -> Path:
        """A verified local copy of an S3 shard, downloaded unless the cache holds it."""
        entry = self.root / "shards" / f"{shard.sha256}.tar"
        if self._is_verified(shard.sha256, entry):
            return entry
        with file_lock(self.root / "locks" / f"{shard.sha256}.lock", "shard download", wait=True):
            if self._is_verified(shard.sha256, entry):
                return entry  # another worker of this node fetched it while we waited
            if entry.exists():
                log.warning("shard cache: %s does not match its record (changed on disk); fetching it again", entry)
                entry.unlink()
            temporary = self.root / "tmp" / f"{shard.sha256}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part"
            try:
                actual = download_file(client, shard.location, temporary)
                self.fetched += 1
                if actual != shard.sha256:
                    raise DataError(shard.diagnose(temporary, actual))
                with open(temporary, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.replace(temporary, entry)
            finally:
                temporary.unlink(missing_ok=True)
            self._record(shard.sha256, entry)
        return entry

    def get(self, shards: list[ShardSource], client_factory: Callable[[], Any]) -> list[Path]:
        """Verified local files for these shards, in order (S3 ones fetched, local ones checked), then evict."""
        client = None
        paths = []
        for shard in shards:
            if is_s3_uri(shard.location):
                client = client or client_factory()
                paths.append(self.fetched_copy(shard, client))
            else:
                paths.append(self.verified_local(shard))
        if client is not None:
            self.evict()
        return paths
