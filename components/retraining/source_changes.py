"""What the source holds that the prepared data set does not: new pairs, and pairs whose content changed.

The source is listed the way `prepare` lists it (the same keys, splits and carved-off val), and
each pair's content checksum (the one the manifest records per sample) is compared with the
manifest. Reading every file to checksum it would make a weekly check of a large bucket as
costly as preparing it, so each file's checksum is kept with a fingerprint the store gives for
free: the S3 ETag (an opaque id: it changes when the object does, whatever it is computed
from) or, for a local file, its size and modification time. A file whose fingerprint is the
one recorded is not read again; a new or changed one is read and hashed.

- new: a key the data set does not hold, whose content it holds under no other name (a renamed
  or moved pair is not new: `prepare` does not add it again);
- changed: a key the data set holds with other content (`mode: append` keeps the old content
  and reports it; `mode: overwrite` takes the new).
"""

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from components.config.data import DataParams
from components.console import StepProgress
from components.data.manifest import Manifest
from components.data.sources import S3Storage, open_source
from components.object_store import split_s3_uri

log = logging.getLogger(__name__)


@dataclass
class SourceChanges:
    source: str
    pairs: int  # pairs the source holds
    new_pairs: dict[str, list[str]] = field(default_factory=dict)  # split -> keys
    changed_pairs: list[str] = field(default_factory=list)  # "split/key"
    # origin file -> {"id": fingerprint, "sha256": content digest}: what the next check starts from
    fingerprints: dict[str, dict[str, str]] = field(default_factory=dict)
    files_read: int = 0

    @property
    def new_count(self) -> int:
        return sum(len(keys) for keys in self.new_pairs.values())

    def summary(self) -> dict:
        return {"source": self.source, "pairs_in_source": self.pairs,
                "new_pairs": {split: len(keys) for split, keys in sorted(self.new_pairs.items())},
                "new_pairs_total": self.new_count, "changed_pairs": self.changed_pairs, "files_read": self.files_read}


def _s3_fingerprints(storage: S3Storage) -> dict[str, str]:
    bucket, prefix = split_s3_uri(storage.uri)
    prefix = prefix + "/" if prefix else ""
    etags = {}
    for page in storage.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            etags[item["Key"].removeprefix(prefix)] = "etag:" + item["ETag"].strip('"')
    return etags


def _fingerprinter(params: DataParams, base_dir: Path) -> tuple[Callable[[str], str | None], Callable[[str], bytes]]:
    """(fingerprint of an origin file or None, read its bytes) for the params' source."""
    source = params.source
    if source.kind == "builtin":
        raise ValueError("a built-in source has no files")
    assert source.path is not None
    if source.path.startswith("s3://"):
        storage = S3Storage(source.path, source.s3)
        etags = _s3_fingerprints(storage)
        return etags.get, storage.read
    root = base_dir / source.path

    def local(relative: str) -> str | None:
        try:
            stat = os.stat(root / relative)
        except OSError:
            return None
        return f"stat:{stat.st_size}:{stat.st_mtime_ns}"

    return local, lambda relative: (root / relative).read_bytes()


def find_source_changes(params: DataParams, base_dir: Path, manifest: Manifest | None,
                        known: dict[str, dict[str, str]], progress: StepProgress | None = None) -> SourceChanges:
    """Compare the source the params name with `manifest` (None: no data set yet, every pair is new).

    known: the fingerprints a previous check returned (`SourceChanges.fingerprints`).
    Raises SourceError (from the listing) when the source cannot be read.
    """
    listing = open_source(params, base_dir)
    changes = SourceChanges(listing.description, len(listing.pairs))
    stored = {(split, sample.key): sample.sha256 for split, part in (manifest.splits.items() if manifest else [])
              for sample in part.samples}
    contents = set(stored.values())
    builtin = params.source.kind == "builtin"
    fingerprint, read = (None, None) if builtin else _fingerprinter(params, base_dir)
    if progress is not None:
        progress.start("comparing the source with the data set", len(listing.pairs))
    for pair in listing.pairs:
        if builtin:
            digests = [hashlib.sha256(blob).digest() for blob in pair.read()]
        else:
            digests = []
            for origin in pair.origin:
                current = fingerprint(origin)
                record = known.get(origin)
                if current is not None and record is not None and record.get("id") == current:
                    digest = record["sha256"]
                else:
                    digest = hashlib.sha256(read(origin)).hexdigest()
                    changes.files_read += 1
                if current is not None:
                    changes.fingerprints[origin] = {"id": current, "sha256": digest}
                digests.append(bytes.fromhex(digest))
        checksum = hashlib.sha256(b"".join(digests)).hexdigest()  # prepare's pair checksum
        held = stored.get((pair.split, pair.key))
        if held is None and checksum not in contents:
            changes.new_pairs.setdefault(pair.split, []).append(pair.key)
        elif held is not None and held != checksum:
            changes.changed_pairs.append(f"{pair.split}/{pair.key}")
        if progress is not None:
            progress.advance()
    if progress is not None:
        progress.close()
    return changes
