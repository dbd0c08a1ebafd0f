"""Where paired images come from: a local folder or s3:// prefix in pix2pix or A/B layout, or the built-in set.

A source lists `SourcePair`s (split, key, origin, a `read()` that returns the raw bytes) and the
problems it found while listing (a half without its partner, an empty split, a file that is
not an image, a symbolic link leading out of the folder). Decoding and validating the bytes is
the writer's job (`components.data.pairs`), so every source is checked the same way.

Symbolic links in a local source: a link (to a file or a folder) is followed only when its
target is inside the source folder; a link out of it, a broken link and a link that loops are
refused as bad inputs naming the link, and nothing outside the folder is ever read.
"""

import hashlib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from components.config.data import DataParams, S3Params
from components.data.manifest import SPLITS
from components.object_store import ObjectStoreError, get_bytes, list_keys, s3_client

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# One file holding both halves side by side (pix2pix), or one file per half.
Layout = Literal["side_by_side", "two_files"]


@dataclass(frozen=True)
class BadInput:
    """An input that cannot become a pair: the file (as the user would look for it) and why."""

    split: str
    path: str
    reason: str

    def as_dict(self) -> dict:
        return {"split": self.split, "path": self.path, "reason": self.reason}


class BadInputError(Exception):
    """Raised by `SourcePair.read` for an unreadable file."""

    def __init__(self, problem: BadInput):
        super().__init__(f"{problem.path}: {problem.reason}")
        self.problem = problem


class SourceError(RuntimeError):
    """The source as a whole cannot be read (missing bucket, no credentials, no train split)."""


@dataclass(frozen=True)
class SourcePair:
    split: str
    key: str  # the WebDataset key: letters, digits, '_' and '-' only
    origin: tuple[str, ...]  # the file(s) relative to the source root, source half first for two_files
    read: Callable[[], tuple[bytes, ...]]  # raw bytes, in origin order; raises BadInputError


@dataclass(frozen=True)
class SourceListing:
    description: str  # what the manifest records as the source (path or URI as given, or "builtin")
    layout: Layout
    pairs: list[SourcePair]  # sorted by (split, key)
    problems: list[BadInput]


class Storage(Protocol):
    """A tree of files addressed by '/'-separated paths relative to its root."""

    description: str
    # path -> why it is not read (a symbolic link out of the tree, ...); reported as bad inputs
    refused: dict[str, str]

    def list_files(self) -> list[str]: ...

    def list_folders(self) -> list[str]: ...

    def read(self, relative: str) -> bytes: ...


class LocalStorage:
    """A local folder; symbolic links are followed only where they stay inside it (see the module doc)."""

    def __init__(self, root: Path, description: str):
        self.root = root
        self.description = description
        self.real_root = root.resolve()
        self.refused: dict[str, str] = {}
        self._files: list[str] = []
        self._folders: list[str] = []
        self._walk(self.real_root, PurePosixPath(), {self.real_root})
        self._files.sort()
        self._folders.sort()

    def _walk(self, folder: Path, relative: PurePosixPath, ancestors: set[Path]) -> None:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda item: item.name):
                if entry.name.startswith("."):
                    continue  # hidden files and folders are never inputs
                path = (relative / entry.name).as_posix()
                if entry.is_symlink():
                    target = Path(entry.path).resolve()
                    if not target.exists():
                        self.refused[path] = f"broken symbolic link (to {os.readlink(entry.path)})"
                        continue
                    if not target.is_relative_to(self.real_root):
                        self.refused[path] = "symbolic link to a location outside the source folder; refused"
                        continue
                    if target.is_dir() and target in ancestors:
                        self.refused[path] = "symbolic link to a folder that contains it (a loop); refused"
                        continue
                    is_dir, is_file, real = target.is_dir(), target.is_file(), target
                else:
                    is_dir, is_file, real = entry.is_dir(), entry.is_file(), Path(entry.path)
                if is_dir:
                    self._folders.append(path)
                    self._walk(real, relative / entry.name, ancestors | {real})
                elif is_file:
                    self._files.append(path)
                else:
                    self.refused[path] = "not a regular file (a device, socket or pipe)"

    def list_files(self) -> list[str]:
        return self._files

    def list_folders(self) -> list[str]:
        return self._folders

    def read(self, relative: str) -> bytes:
        # Checked again at read time: a file replaced by a link after listing is not followed out.
        real = (self.root / relative).resolve()
        if not real.is_relative_to(self.real_root):
            raise OSError(f"{relative} now leads outside the source folder (a symbolic link); refused")
        return real.read_bytes()


class S3Storage:
    """Objects under s3://bucket/prefix; only ListObjectsV2 and GetObject are called."""

    def __init__(self, uri: str, params: S3Params):
        self.description = uri
        self.uri = uri.rstrip("/")
        self.refused: dict[str, str] = {}
        self.max_attempts = params.max_attempts
        self.client = s3_client(params.endpoint_url, params.region, params.max_attempts)

    def list_files(self) -> list[str]:
        try:
            return list_keys(self.client, self.uri)
        except ObjectStoreError as error:
            raise SourceError(f"{self.description}: {error}") from None

    def list_folders(self) -> list[str]:
        # S3 has no folders; an empty "folder" cannot exist, so only folders holding files count.
        return sorted({str(PurePosixPath(f).parent) for f in self.list_files()} - {"."})

    def read(self, relative: str) -> bytes:
        return get_bytes(self.client, f"{self.uri}/{relative}", attempts=self.max_attempts)


def make_key(stem: str) -> str:
    """A WebDataset key for a file stem: no dots (they start the extension), short enough for a tar header."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", stem)
    if len(key) > 64:
        key = key[:48] + "-" + hashlib.sha256(stem.encode()).hexdigest()[:12]
    return key


def is_val_by_hash(key: str, seed: int, fraction: float) -> bool:
    """The seeded rule that carves val off train: a pair's fate depends on its key alone, so
    appending pairs never moves an existing one between splits."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _reader(storage: Storage, split: str, paths: tuple[str, ...]) -> Callable[[], tuple[bytes, ...]]:
    def read() -> tuple[bytes, ...]:
        blobs = []
        for path in paths:
            try:
                blobs.append(storage.read(path))
            except OSError as error:
                raise BadInputError(BadInput(split, path, f"cannot be read: {error}")) from None
        return tuple(blobs)

    return read


def _split_of(parts: tuple[str, ...], split_layout: bool) -> str | None:
    if split_layout:
        return parts[0] if len(parts) == 2 and parts[0] in SPLITS else None
    return "train" if len(parts) == 1 else None


def _collect_images(
    files: list[str], prefix: tuple[str, ...], split_layout: bool, problems: list[BadInput]
) -> dict[str, dict[str, str]]:
    """split -> key -> path for the image files under `prefix`; others become problems."""
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for path in files:
        parts = PurePosixPath(path).parts
        if parts[: len(prefix)] != prefix or any(part.startswith(".") for part in parts):
            continue  # another layout's folder, or hidden files (.DS_Store, editor backups)
        split = _split_of(parts[len(prefix):], split_layout)
        is_image = PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES
        if split is None:
            if is_image:  # an image outside the layout is an input the user may think is used
                folder = "/".join(prefix) + "/" if prefix else ""
                expected = f"{folder}train|val|test/<image>" if split_layout else f"{folder}<image>"
                problems.append(BadInput("-", path, f"outside the layout (expected {expected}); move or remove it"))
            continue  # a README or licence next to the data is not an input
        if not is_image:
            problems.append(BadInput(split, path, f"not an image file type ({PurePosixPath(path).suffix or 'no suffix'})"))
            continue
        key = make_key(PurePosixPath(path).stem)
        if key in found[split]:
            other = found[split][key]
            problems.append(BadInput(split, path, f"same pair key {key!r} as {other}; rename one of them"))
            continue
        found[split][key] = path
    return found


def _has_split_folders(folders: list[str], prefix: tuple[str, ...]) -> bool:
    return any(PurePosixPath(f).parts == prefix + (split,) for f in folders for split in SPLITS)


def list_file_pairs(storage: Storage, kind: str, direction: str) -> SourceListing:
    """Pairs of a pix2pix or A/B tree. Without train/ val/ test/ folders every image is train."""
    files = storage.list_files()
    folders = storage.list_folders()
    problems: list[BadInput] = []
    for path, reason in sorted(storage.refused.items()):
        parts = PurePosixPath(path).parts[0 if kind == "pix2pix" else 1 :]
        problems.append(BadInput(parts[0] if parts and parts[0] in SPLITS else "-", path, reason))
    pairs: list[SourcePair] = []
    if kind == "pix2pix":
        split_layout = _has_split_folders(folders, ())
        images = _collect_images(files, (), split_layout, problems)
        for split, by_key in images.items():
            for key, path in by_key.items():
                pairs.append(SourcePair(split, key, (path,), _reader(storage, split, (path,))))
        present = {split for split in SPLITS if split in folders} if split_layout else {"train"}
        layout: Layout = "side_by_side"
    else:
        split_layout = _has_split_folders(folders, ("A",)) or _has_split_folders(folders, ("B",))
        side_a = _collect_images(files, ("A",), split_layout, problems)
        side_b = _collect_images(files, ("B",), split_layout, problems)
        present = set()
        for split in SPLITS:
            in_a, in_b = side_a.get(split, {}), side_b.get(split, {})
            if split_layout and (f"A/{split}" in folders or f"B/{split}" in folders):
                present.add(split)
            for key in sorted(in_a.keys() | in_b.keys()):
                if key not in in_b:
                    problems.append(BadInput(split, in_a[key], "its partner is missing from B/ (pairs match by file name)"))
                elif key not in in_a:
                    problems.append(BadInput(split, in_b[key], "its partner is missing from A/ (pairs match by file name)"))
                else:
                    source_half, target_half = (in_a[key], in_b[key]) if direction == "AtoB" else (in_b[key], in_a[key])
                    paths = (source_half, target_half)
                    pairs.append(SourcePair(split, key, paths, _reader(storage, split, paths)))
        if not split_layout:
            present = {"train"}
        layout = "two_files"
    for split in sorted(present):
        if not any(pair.split == split for pair in pairs):
            problems.append(BadInput(split, f"{split}/", "empty split: the folder holds no complete image pairs"))
    if not any(pair.split == "train" for pair in pairs):
        refused = "".join(f"\n  {problem.path}: {problem.reason}" for problem in problems[:20])
        raise SourceError(
            f"{storage.description}: no training pairs found for layout {kind} "
            f"(expected {'train/*.jpg' if kind == 'pix2pix' else 'A/train/*.jpg and B/train/*.jpg'}, or the images directly)"
            + (f"; problems found:{refused}" if refused else "")
        )
    pairs.sort(key=lambda pair: (pair.split, pair.key))
    return SourceListing(storage.description, layout, pairs, problems)


def carve_val(listing: SourceListing, fraction: float, seed: int) -> SourceListing:
    """Move a seeded share of train to val when the source has no val split of its own."""
    if fraction == 0 or any(pair.split == "val" for pair in listing.pairs) or any(
        problem.split == "val" for problem in listing.problems
    ):
        return listing
    pairs = [
        SourcePair("val", pair.key, pair.origin, pair.read)
        if pair.split == "train" and is_val_by_hash(pair.key, seed, fraction)
        else pair
        for pair in listing.pairs
    ]
    pairs.sort(key=lambda pair: (pair.split, pair.key))
    return SourceListing(listing.description, listing.layout, pairs, listing.problems)


def open_source(params: DataParams, base_dir: Path) -> SourceListing:
    """List the pairs the params point at (val carved off train where the source has none)."""
    source = params.source
    if source.kind == "builtin":
        from components.data.builtin import list_builtin_pairs

        return list_builtin_pairs(source.builtin, params.image_size, source.direction)
    assert source.path is not None  # guaranteed by SourceParams validation
    storage: Storage
    if source.path.startswith("s3://"):
        storage = S3Storage(source.path, source.s3)
    else:
        root = base_dir / source.path
        if not root.is_dir():
            raise SourceError(f"source.path {source.path!r}: not an existing folder (looked at {root.resolve()})")
        storage = LocalStorage(root, source.path)
    listing = list_file_pairs(storage, source.kind, source.direction)
    log.info("source %s: %d pairs listed, %d problems", listing.description, len(listing.pairs), len(listing.problems))
    return carve_val(listing, params.val_fraction, params.seed)
