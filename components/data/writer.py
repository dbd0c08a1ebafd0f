"""Writing a prepared data set: WebDataset tar shards, their DALI indices and the manifest.

Guarantees (docs/data.md explains them to users):
- Deterministic: pairs in key order, tar headers fixed (mtime 0, uid/gid 0, mode 0444), JPEG
  encoding at a fixed quality; no time or absolute path enters a shard or the manifest.
- Atomic: shards are written in a staging folder of this run next to the output. Overwrite
  swaps the whole folder in with two renames; append moves only new shards in, then replaces
  the manifest, the commit point. A crash at any moment leaves the last committed data set
  readable, and the next run cleans up and completes.
- On S3 (`out` is s3://bucket/prefix): shards are staged in a local temporary folder, then
  uploaded, the manifest last. Overwrite removes the old manifest before the first upload
  that changes a shard it lists, so a reader finds the old data set, none, or the new one,
  never a mix; unchanged shards are not uploaded again.
- Exclusive: the whole run holds the output's lock (components/locks.py); a second run on
  the same output stops at once, naming the holder.
- Append: existing shards are never rewritten; new pairs get the next indices in new shards;
  a pair whose bytes changed under the same key is reported and keeps its old content.
"""

import hashlib
import io
import json
import logging
import os
import shutil
import struct
import tarfile
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from components.config.data import DataParams
from components.data.integrity import dali_index_text, file_sha256, read_tar_samples, stored_digest
from components.data.manifest import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    SampleEntry,
    ShardEntry,
    SplitManifest,
    load_manifest,
    manifest_body,
    manifest_bytes,
    write_manifest,
)
from components.data.pairs import encode_pair
from components.data.sources import BadInput, BadInputError, SourceListing, SourcePair
from components.locks import DEFAULT_TTL_S, HeldLock, exclusive_lock
from components.object_store import (
    delete_object,
    is_s3_uri,
    join_s3_uri,
    list_keys,
    put_bytes,
    s3_client,
    upload_file,
)

log = logging.getLogger(__name__)

PREPARE_PURPOSE = "pairgan prepare"  # what a refused second run is told the lock holder does

# Params that decide the bytes of a shard: appending with other values would mix two data sets.
SHARD_DEFINING_PARAMS = ("source", "image_size", "jpeg_quality", "jpeg_chroma", "val_fraction", "seed")
# Data sets prepared before jpeg_chroma was a param have no such key: they stored both sides at 4:4:4.
CHROMA_BEFORE_THE_PARAM = {"source": "4:4:4", "target": "4:4:4"}


class PrepareError(RuntimeError):
    """The stage could not produce a data set; `problems` lists every bad input when that is why."""

    def __init__(self, message: str, problems: list[BadInput] | None = None):
        self.problems = problems or []
        lines = [f"  {p.path}: {p.reason}" for p in self.problems]
        super().__init__("\n".join([message, *lines]))


@dataclass
class PrepareResult:
    manifest: Manifest
    new_pairs: int
    missing_from_source: int  # pairs still in the shards whose files are gone from the source
    seconds: float

    def report(self) -> dict:
        """The stage report (DVC metrics): counts, what was skipped or changed, time taken."""
        counts = {name: split.count for name, split in self.manifest.splits.items()}
        return {
            "counts": counts,
            "total": sum(counts.values()),
            "new_pairs": self.new_pairs,
            "skipped": len(self.manifest.skipped),
            "changed": len(self.manifest.changed),
            "missing_from_source": self.missing_from_source,
            "seconds": round(self.seconds, 3),
            "pairs_per_second": round(self.new_pairs / self.seconds, 1) if self.seconds > 0 else 0.0,
            "manifest_checksum": self.manifest.checksum,
            "skipped_inputs": self.manifest.skipped,
            "changed_pairs": self.manifest.changed,
        }


@dataclass
class _Encoded:
    key: str
    origin: tuple[str, ...]
    checksum: str
    source_jpeg: bytes
    target_jpeg: bytes


@dataclass(frozen=True)
class _AlreadyStored:
    """A new name whose content the data set already holds (a moved or renamed pair)."""

    split: str
    entry: SampleEntry


@dataclass
class _SplitState:
    """A split while it is being written: the committed part plus the new samples and shards."""

    shards: list[ShardEntry]
    samples: list[SampleEntry]
    pending: list[_Encoded] = field(default_factory=list)


def _pair_checksum(blobs: tuple[bytes, ...]) -> str:
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_shard(tar_path: Path, index_path: Path, samples: list[tuple[_Encoded, int]],
                source: str) -> tuple[str, list[str]]:
    """Write one tar shard and its DALI index; return the tar's SHA-256 and each sample's `stored_digest`.

    Members per sample: KEY.src.jpg, KEY.tgt.jpg, KEY.json (origin, checksum, index) and
    KEY.index (the dataset index as 8 bytes little-endian int64, which DALI reads as INT64).
    """
    digests = []
    with tarfile.open(tar_path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample, index in samples:
            meta = {"key": sample.key, "index": index, "source": source, "origin": list(sample.origin), "sha256": sample.checksum}
            members = (
                ("src.jpg", sample.source_jpeg),
                ("tgt.jpg", sample.target_jpeg),
                ("json", json.dumps(meta, sort_keys=True).encode()),
                ("index", struct.pack("<q", index)),
            )
            for suffix, data in members:
                tar.addfile(*_tar_member(f"{sample.key}.{suffix}", data))
            digests.append(stored_digest([data for _, data in members]))
    # the same index DALI's wds2idx writes, made here so that prepare does not need DALI
    index_path.write_text(dali_index_text(read_tar_samples(tar_path)))
    return file_sha256(tar_path), digests


Item = TypeVar("Item")
Result = TypeVar("Result")


def _ordered_map(function: Callable[[Item], Result], items: Iterable[Item], workers: int) -> Iterator[Result]:
    """`map` on a thread pool (Pillow and boto3 release the GIL) with a bounded look-ahead,
    results in input order so the output stays deterministic."""
    ahead = 4 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _staging_name(out_dir: Path) -> str:
    return f".{out_dir.name}.staging"


def _old_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.old"


def _recover(out_dir: Path) -> None:
    """Undo what interrupted runs left: their staging folders, and a half-done folder swap.

    Called with the output's lock held: no other run is working on it, so every staging
    folder is stale (its run was interrupted) and can go.
    """
    old = _old_path(out_dir)
    if old.exists():
        if out_dir.exists():
            shutil.rmtree(old)  # the swap finished; only the clean-up was interrupted
        else:
            os.replace(old, out_dir)  # the swap was interrupted: bring the committed set back
            log.warning("restored %s from an interrupted run", out_dir)
    for staging in sorted(out_dir.parent.glob(_staging_name(out_dir) + "*")):
        log.warning("removing %s left by an interrupted run", staging)
        shutil.rmtree(staging)


def _remove_uncommitted_shards(out_dir: Path, manifest: Manifest) -> None:
    """Shards a crashed append moved in but never committed to the manifest."""
    listed = _listed_files(manifest)
    for split in SPLITS:
        for path in sorted((out_dir / split).glob(f"{split}-*")):
            if path.relative_to(out_dir).as_posix() not in listed:
                log.warning("removing %s: written by an interrupted run, never committed", path)
                path.unlink()


def _listed_files(manifest: Manifest) -> set[str]:
    return {name for split in manifest.splits.values() for shard in split.shards for name in (shard.tar, shard.index)}


def _shard_defining(params_used: dict) -> dict[str, object]:
    """Dotted key -> value of every param that decides a shard's bytes. The built-in source's
    pair counts are not among them (raising a count is how new built-in pairs appear), nor the
    S3 connection settings (a new endpoint or retry count reads the same objects)."""
    values = {key: params_used.get(key) for key in SHARD_DEFINING_PARAMS if key not in ("source", "jpeg_chroma")}
    chroma = params_used.get("jpeg_chroma", CHROMA_BEFORE_THE_PARAM)
    values |= {f"jpeg_chroma.{side}": chroma[side] for side in ("source", "target")}
    source = params_used.get("source", {})
    for key, value in source.items():
        if key == "s3":
            continue  # how to reach the store (endpoint, region, retries), not what is in it
        if key == "builtin":
            values |= {f"source.builtin.{k}": v for k, v in value.items() if not k.endswith("_pairs")}
        else:
            values[f"source.{key}"] = value
    return values


def _check_append_compatible(existing: Manifest, params_used: dict) -> None:
    old, new = _shard_defining(existing.params), _shard_defining(params_used)
    for key in new:
        if old.get(key) != new[key]:
            raise PrepareError(
                f"mode append: params key {key} differs from the one the existing data set in {existing.location} "
                f"was prepared with ({old.get(key)!r} -> {new[key]!r}); appending would mix "
                "two data sets. Use mode: overwrite to rebuild, or restore the old value."
            )


@dataclass
class _Written:
    """What a run wrote into its staging folder: the new manifest body and the counts of the report."""

    body: dict
    new_pairs: int
    missing_from_source: int


def _write_into_staging(params: DataParams, listing: SourceListing, existing: Manifest | None, params_used: dict,
                        staging: Path, progress: bool, on_shard_written: Callable[[Path], None] | None) -> _Written:
    """Encode the source's new pairs into shards under `staging` (existing shards are not copied).

    Raises PrepareError listing every bad input when on_bad_input is stop.
    """
    states = {
        split: _SplitState(
            shards=list(existing.splits[split].shards) if existing and split in existing.splits else [],
            samples=list(existing.splits[split].samples) if existing and split in existing.splits else [],
        )
        for split in SPLITS
    }
    known = {split: {s.key: s for s in state.samples} for split, state in states.items()}
    # content already stored under any name: a pair moved to another split (a val/ folder
    # added after val was carved off train) or renamed must not be added a second time
    stored = {s.sha256: _AlreadyStored(split, s) for split, state in states.items() for s in state.samples}
    problems: list[BadInput] = list(listing.problems)
    changed: list[dict] = []
    new_pairs = 0

    def process(pair: SourcePair) -> _Encoded | list[BadInput] | SampleEntry | _AlreadyStored | None:
        """The encoded new pair, its problems, the old entry when it changed, where its content
        already is when it was stored under another name, or None if unchanged."""
        try:
            blobs = pair.read()
        except BadInputError as error:
            return [error.problem]
        checksum = _pair_checksum(blobs)
        old_entry = known[pair.split].get(pair.key)
        if old_entry is not None:
            return None if old_entry.sha256 == checksum else old_entry
        if checksum in stored:
            return stored[checksum]
        encoded = encode_pair(pair, blobs, listing.layout, params.source.direction, params.image_size,
                              params.jpeg_quality, params.jpeg_chroma, params.max_upscale, params.max_aspect_ratio)
        if isinstance(encoded, list):
            return encoded
        return _Encoded(pair.key, pair.origin, checksum, *encoded)

    def flush(split: str, state: _SplitState) -> None:
        number = len(state.shards)
        tar_name, index_name = f"{split}/{split}-{number:06d}.tar", f"{split}/{split}-{number:06d}.idx"
        (staging / split).mkdir(exist_ok=True)
        first_index = len(state.samples)
        indexed = [(sample, first_index + i) for i, sample in enumerate(state.pending)]
        sha256, digests = write_shard(staging / tar_name, staging / index_name, indexed, listing.description)
        state.shards.append(ShardEntry(tar_name, index_name, sha256, len(indexed), first_index))
        state.samples.extend(
            SampleEntry(sample.key, index, number, list(sample.origin), sample.checksum, digest)
            for (sample, index), digest in zip(indexed, digests)
        )
        state.pending = []
        if on_shard_written is not None:
            on_shard_written(staging / tar_name)

    with tqdm(total=len(listing.pairs), unit="pair", desc="prepare", disable=not progress) as bar:
        for pair, outcome in zip(listing.pairs, _ordered_map(process, listing.pairs, os.cpu_count() or 1)):
            bar.update(1)
            if isinstance(outcome, list):
                problems.extend(outcome)
            elif isinstance(outcome, SampleEntry):
                changed.append({
                    "split": pair.split, "key": pair.key, "origin": list(pair.origin),
                    "reason": f"content changed since it was written as index {outcome.index}; the old content is kept",
                })
            elif isinstance(outcome, _AlreadyStored):
                changed.append({
                    "split": pair.split, "key": pair.key, "origin": list(pair.origin),
                    "reason": f"same content as {outcome.split}/{outcome.entry.key} (index {outcome.entry.index}), "
                              "already in the data set; not added again",
                })
            elif outcome is not None:
                new_pairs += 1
                if problems and params.on_bad_input == "stop":
                    continue  # nothing will be committed: check the rest (to report every bad file), keep none
                state = states[pair.split]
                state.pending.append(outcome)
                if len(state.pending) == params.shard_max_count:
                    flush(pair.split, state)
    problems.sort(key=lambda problem: (problem.path, problem.reason))
    if problems and params.on_bad_input == "stop":
        raise PrepareError(
            f"{len(problems)} bad input(s) in {listing.description}; nothing was written "
            "(fix them, or set on_bad_input: skip to write the good pairs and list these as skipped)",
            problems,
        )
    for split, state in states.items():
        if state.pending:
            flush(split, state)
    for problem in problems:
        log.warning("skipped %s: %s", problem.path, problem.reason)
    for item in changed:
        log.warning("changed pair %s/%s not re-added: %s", item["split"], item["key"], item["reason"])
    splits = {split: SplitManifest(state.shards, state.samples) for split, state in states.items()}
    body = manifest_body(params.image_size, listing.description, params_used, splits,
                         [p.as_dict() for p in problems], changed)
    current = {(pair.split, pair.key) for pair in listing.pairs}
    missing = sum(1 for split, state in states.items() for s in state.samples if (split, s.key) not in current)
    if missing:
        log.warning("%d pair(s) in the data set are no longer in the source; they stay in their shards", missing)
    return _Written(body, new_pairs, missing)


def prepare_dataset(
    params: DataParams,
    listing: SourceListing,
    out: Path | str,
    progress: bool = True,
    on_shard_written: Callable[[Path], None] | None = None,
    client: Any = None,
    lock_ttl_s: int = DEFAULT_TTL_S,
) -> PrepareResult:
    """Write (or extend, with mode append) the prepared data set in `out`: a local folder or s3://bucket/prefix.

    Holds the output's exclusive lock for the whole run: raises components.locks.LockHeld at
    once, naming the holder, when another run holds it.
    on_shard_written: called with each shard's staging path once it is complete (progress
    hooks; tests use it to kill the process mid-run).
    client: the boto3 client for an S3 output (default: boto3's standard configuration).
    lock_ttl_s: how long the S3 lock of a run that crashed blocks the next one.
    Raises PrepareError listing every bad input when on_bad_input is stop.
    """
    started = time.perf_counter()
    # The loader section is read by training, not by prepare: leaving it out keeps the data
    # set (and its checksum) unchanged when only augmentation settings change.
    params_used = params.model_dump(mode="json", exclude={"loader"})
    if is_s3_uri(out):
        client = client or s3_client()
        with exclusive_lock(out, PREPARE_PURPOSE, ttl_s=lock_ttl_s, client=client) as lock:
            written = _prepare_on_s3(params, listing, out.rstrip("/"), params_used, progress, on_shard_written,
                                     client, lock)
        manifest = load_manifest(out, client)
    else:
        out_dir = Path(out)
        with exclusive_lock(out_dir, PREPARE_PURPOSE) as lock:
            written = _prepare_local(params, listing, out_dir, params_used, progress, on_shard_written, lock)
        manifest = load_manifest(out_dir)
    return PrepareResult(manifest, written.new_pairs, written.missing_from_source, time.perf_counter() - started)


def _prepare_local(params: DataParams, listing: SourceListing, out_dir: Path, params_used: dict, progress: bool,
                   on_shard_written: Callable[[Path], None] | None, lock: HeldLock) -> _Written:
    _recover(out_dir)
    existing = None
    if (out_dir / MANIFEST_NAME).exists():
        if params.mode == "append":
            existing = load_manifest(out_dir)
            _check_append_compatible(existing, params_used)
            _remove_uncommitted_shards(out_dir, existing)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise PrepareError(f"refusing to write into {out_dir}: it is not empty and holds no {MANIFEST_NAME}")
    if params.mode == "append" and existing is None:
        log.info("mode append: no data set in %s yet, writing a new one", out_dir)

    # this run's own staging folder: a folder another run left is removed by _recover, never reused
    staging = out_dir.parent / f"{_staging_name(out_dir)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        written = _write_into_staging(params, listing, existing, params_used, staging, progress, on_shard_written)
        lock.check()
        if existing is None:
            write_manifest(staging, written.body)
            old = _old_path(out_dir)
            if out_dir.exists():
                os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                target = out_dir / path.relative_to(staging)
                target.parent.mkdir(exist_ok=True)
                os.replace(path, target)
            write_manifest(out_dir, written.body)  # the commit point
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _is_shard_file(relative: str) -> bool:
    split, _, name = relative.partition("/")
    return split in SPLITS and name.startswith(f"{split}-") and name.endswith((".tar", ".idx")) and "/" not in name


def _upload_and_commit(client: Any, uri: str, staging: Path, body: dict, existing: Manifest | None,
                       appending: bool, progress: bool, lock: HeldLock) -> None:
    """Upload the staged shards (those an overwrite leaves byte-identical are skipped), then the manifest."""
    unchanged = set()
    if existing is not None and not appending:
        new_checksums = {shard["tar"]: shard["sha256"] for split in body["splits"].values() for shard in split["shards"]}
        unchanged = {
            name for split in existing.splits.values() for shard in split.shards for name in (shard.tar, shard.index)
            if new_checksums.get(shard.tar) == shard.sha256
        }
    uploads = sorted(p for p in staging.rglob("*") if p.is_file() and p.relative_to(staging).as_posix() not in unchanged)
    lock.check()
    if existing is not None and not appending and uploads:
        # Overwrite: the old manifest lists shards about to change; without it the prefix
        # holds no data set until the new manifest is written, never a mix of two.
        delete_object(client, join_s3_uri(uri, MANIFEST_NAME))
    for path in tqdm(uploads, unit="file", desc="upload", disable=not progress):
        upload_file(client, path, join_s3_uri(uri, path.relative_to(staging).as_posix()))
    lock.check()
    put_bytes(client, join_s3_uri(uri, MANIFEST_NAME), manifest_bytes(body)[0], "application/json")  # the commit point


def _prepare_on_s3(params: DataParams, listing: SourceListing, uri: str, params_used: dict, progress: bool,
                   on_shard_written: Callable[[Path], None] | None, client: Any, lock: HeldLock) -> _Written:
    existing_keys = list_keys(client, uri)
    existing = load_manifest(uri, client) if MANIFEST_NAME in existing_keys else None
    if existing is None:
        foreign = [key for key in existing_keys if not _is_shard_file(key)]
        if foreign:
            raise PrepareError(f"refusing to write into {uri}: it holds objects that are not a data set "
                               f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and no {MANIFEST_NAME}")
    append_to = existing if params.mode == "append" else None
    if append_to is not None:
        _check_append_compatible(append_to, params_used)
    elif params.mode == "append":
        log.info("mode append: no data set in %s yet, writing a new one", uri)

    with tempfile.TemporaryDirectory(prefix="pairgan-prepare-") as folder:
        staging = Path(folder)
        written = _write_into_staging(params, listing, append_to, params_used, staging, progress, on_shard_written)
        checksum = manifest_bytes(written.body)[1]
        if existing is not None and existing.checksum == checksum:
            log.info("%s already holds this data set (manifest %s); nothing to upload", uri, checksum[:12])
        else:
            _upload_and_commit(client, uri, staging, written.body, existing, append_to is not None, progress, lock)
    listed = {name for split in written.body["splits"].values() for shard in split["shards"]
              for name in (shard["tar"], shard["index"])}
    for key in existing_keys:
        if _is_shard_file(key) and key not in listed:
            log.info("removing %s: not part of the committed data set", join_s3_uri(uri, key))
            delete_object(client, join_s3_uri(uri, key))
    return written
