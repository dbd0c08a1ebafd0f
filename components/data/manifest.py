"""The manifest of a prepared data set: what `prepare` wrote and what the loaders read.

`manifest.json` is written last by `prepare` (temp file + os.replace locally, the last upload
on S3): it is the commit point, so a reader that finds it finds every shard it lists complete.
Its `checksum` (SHA-256 of the canonical JSON body) identifies the data set and tags every
MLflow run trained on it. A data set lives in a local folder or under an s3:// prefix.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from components.atomic_files import write_bytes_atomic
from components.object_store import ObjectMissing, ObjectStoreError, get_bytes, is_s3_uri, join_s3_uri, s3_client
from components.stored_folder import join_location

MANIFEST_NAME = "manifest.json"
FORMAT = "pairgan-shards/1"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ShardEntry:
    tar: str  # path relative to the manifest's folder
    index: str  # the DALI webdataset index (wds2idx format) next to it
    sha256: str
    count: int
    first_index: int  # samples first_index .. first_index + count - 1, in this order


@dataclass(frozen=True)
class SampleEntry:
    key: str
    index: int  # position in the split's sample list; never changes once written
    shard: int  # position in the split's shard list
    origin: list[str]  # source file(s), relative to the source root
    sha256: str  # of the source bytes: tells a changed pair from an unchanged one
    # of the sample's members as stored in its shard (`stored_digest`): names the damaged sample
    # of a shard that fails its checksum; None in data sets written before it was recorded
    stored_sha256: str | None = None


@dataclass(frozen=True)
class SplitManifest:
    shards: list[ShardEntry] = field(default_factory=list)
    samples: list[SampleEntry] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class Manifest:
    image_size: int
    source: str
    params: dict
    splits: dict[str, SplitManifest]
    skipped: list[dict]  # {"split", "path", "reason"}: inputs of the last run not written
    changed: list[dict]  # {"split", "key", "origin", "reason"}: pairs kept at their old content
    checksum: str
    # the folder the shard paths are relative to: an absolute local path or an s3:// URI (not serialised)
    location: str

    def split(self, name: str) -> SplitManifest:
        if name not in self.splits:
            raise KeyError(f"{self.file_location()}: no split {name!r} (has {', '.join(self.splits)})")
        return self.splits[name]

    def member_location(self, relative: str) -> str:
        """Where a file the manifest names (a shard, an index) is: a local path or an s3:// URI."""
        return join_location(self.location, relative)

    def file_location(self) -> str:
        return self.member_location(MANIFEST_NAME)


class ManifestError(ValueError):
    """A manifest is missing, unreadable or inconsistent."""


def manifest_body(image_size: int, source: str, params: dict, splits: dict[str, SplitManifest],
                  skipped: list[dict], changed: list[dict]) -> dict:
    """The JSON body (without checksum), in a fixed key order so equal data sets give equal bytes."""
    return {
        "format": FORMAT,
        "image_size": image_size,
        "source": source,
        "params": params,
        "counts": {name: split.count for name, split in splits.items()},
        "splits": {
            name: {"shards": [asdict(s) for s in split.shards], "samples": [asdict(s) for s in split.samples]}
            for name, split in splits.items()
        },
        "skipped": skipped,
        "changed": changed,
    }


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def manifest_bytes(body: dict) -> tuple[bytes, str]:
    """The manifest file's content for this body, and its checksum."""
    checksum = hashlib.sha256(_canonical(body)).hexdigest()
    return (json.dumps({**body, "checksum": checksum}, indent=1, sort_keys=True) + "\n").encode(), checksum


def write_manifest(folder: Path, body: dict) -> str:
    """Write `folder/manifest.json` atomically; return its checksum."""
    content, checksum = manifest_bytes(body)
    write_bytes_atomic(folder / MANIFEST_NAME, content)
    return checksum


def _check_inside(manifest_path: str, key: str, relative: str) -> None:
    # Shard paths are relative to the manifest's folder: a reader must never be sent outside it.
    posix = PurePosixPath(relative)
    if posix.is_absolute() or ".." in posix.parts or "\\" in relative or (len(relative) > 1 and relative[1] == ":"):
        raise ManifestError(f"{manifest_path}: {key} {relative!r} leaves the data set's folder (absolute or '..')")


def _read_manifest_text(location: str, client: Any) -> tuple[str, str, str]:
    """(manifest file, data set folder, text) for a folder or its manifest.json, local or s3://."""
    if is_s3_uri(location):
        folder = location.rstrip("/").removesuffix("/" + MANIFEST_NAME)
        path = join_s3_uri(folder, MANIFEST_NAME)
        try:
            return path, folder, get_bytes(client or s3_client(), path).decode("utf-8")
        except ObjectMissing:
            raise ManifestError(f"{path}: no manifest; run `pairgan prepare` first") from None
        except (ObjectStoreError, UnicodeDecodeError) as error:
            raise ManifestError(f"{path}: cannot be read: {error}") from None
    local = Path(location)
    if local.is_dir():
        local = local / MANIFEST_NAME
    try:
        return str(local), str(local.parent.resolve()), local.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{local}: no manifest; run `pairgan prepare` first") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{local}: cannot be read: {error}") from None


def load_manifest(location: Path | str, client: Any = None) -> Manifest:
    """Read a manifest and check its checksum.

    location: the data set's folder or its manifest.json, local or s3://bucket/prefix.
    client: the boto3 client for S3 (default: boto3's standard configuration, e.g. AWS_ENDPOINT_URL).
    """
    path, folder, text = _read_manifest_text(str(location), client)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: cannot be read as JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a pairgan manifest (expected format {FORMAT})")
    checksum = data.pop("checksum", None)
    if checksum != hashlib.sha256(_canonical(data)).hexdigest():
        raise ManifestError(f"{path}: checksum mismatch: the manifest was edited or truncated")
    for name, split in data["splits"].items():
        for number, shard in enumerate(split["shards"]):
            for member in ("tar", "index"):
                _check_inside(path, f"splits.{name}.shards[{number}].{member}", shard[member])
    splits = {
        name: SplitManifest(
            shards=[ShardEntry(**s) for s in split["shards"]],
            samples=[SampleEntry(**s) for s in split["samples"]],
        )
        for name, split in data["splits"].items()
    }
    return Manifest(
        image_size=data["image_size"], source=data["source"], params=data["params"], splits=splits,
        skipped=data["skipped"], changed=data["changed"], checksum=checksum, location=folder,
    )
