"""Shard integrity: checksums, the DALI index of a shard, and what exactly is wrong with a damaged one.

Every reader verifies a shard against the manifest's SHA-256 before using it (see
`shard_cache.py`). When a shard fails, `diagnose_shard` says why in terms a user can act on:
which samples are missing from a shard cut short, which sample's JPEG does not decode, or
that every sample reads but the bytes differ from what `prepare` wrote.
"""

import hashlib
import io
import struct
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from components.data.manifest import SampleEntry, ShardEntry

# The members `prepare` writes per sample, in this order (see writer.py).
MEMBER_SUFFIXES = ("src.jpg", "tgt.jpg", "json", "index")
DALI_INDEX_VERSION = "v1.2"


class DataError(ValueError):
    """A shard or a sample of a prepared data set is damaged or unreadable. Deterministic: a retry
    reads the same bytes, so training reports it and stops instead of restarting workers."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TarMember:
    suffix: str  # what follows the key's first dot: src.jpg, tgt.jpg, json, index
    offset: int  # of the data, in bytes from the start of the tar
    size: int
    name: str


@dataclass(frozen=True)
class TarSample:
    key: str
    members: tuple[TarMember, ...]


def stored_digest(members: list[bytes]) -> str:
    """SHA-256 identifying a sample's members as stored (in order): the manifest's `stored_sha256`."""
    digest = hashlib.sha256()
    for data in members:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def split_member_name(name: str) -> tuple[str, str]:
    """(key, suffix) the way WebDataset and DALI split a member name: at the first dot of its file name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def read_tar_samples(path: Path, until_damage: bool = False) -> list[TarSample]:
    """The samples of a shard, in order, from its headers only.

    Raises tarfile.TarError for an unreadable tar, unless until_damage: then the samples
    before the first unreadable header.
    """
    samples: list[TarSample] = []
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, suffix = split_member_name(member.name)
                entry = TarMember(suffix, member.offset_data, member.size, member.name)
                if samples and samples[-1].key == key:
                    samples[-1] = TarSample(key, samples[-1].members + (entry,))
                else:
                    samples.append(TarSample(key, (entry,)))
    except tarfile.TarError:
        if not until_damage:
            raise
    return samples


def dali_index_text(samples: list[TarSample]) -> str:
    """A DALI webdataset index (the format of `wds2idx`) listing these samples only.

    DALI's reader reads exactly the samples its index lists, so an index holding a rank's
    own samples makes DALI read that rank's share and nothing else.
    """
    if not samples:
        raise ValueError("a DALI index needs at least one sample")
    lines = [f"{DALI_INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{m.suffix} {m.offset} {m.size} {m.name}" for m in sample.members))
    return "\n".join(lines) + "\n"


def _jpeg_problem(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except Exception as error:  # noqa: BLE001 - any decoder failure is the answer here
        return f"{type(error).__name__}: {error}"
    return None


def diagnose_shard(path: Path, label: str, split: str, shard: ShardEntry, samples: list[SampleEntry],
                   expected_sha256: str, actual_sha256: str) -> str:
    """Why a shard whose checksum did not match is damaged, naming the shard (`label`) and the sample.

    samples: the manifest's entries of this shard's samples, in order.
    """
    def sample_name(entry: SampleEntry) -> str:
        return f"sample {split}/{entry.key} (index {entry.index})"

    found = read_tar_samples(path, until_damage=True)
    by_key = {sample.key: sample for sample in found}
    size = path.stat().st_size
    with open(path, "rb") as handle:
        for entry in samples:
            sample = by_key.get(entry.key)
            if sample is None:
                missing = [e for e in samples if e.key not in by_key]
                shown = ", ".join(f"{split}/{e.key}" for e in missing[:5]) + (", ..." if len(missing) > 5 else "")
                return (f"{label}, {sample_name(entry)}: missing; {len(missing)} of the shard's {len(samples)} "
                        f"samples are not in it ({shown}): the shard was cut short or rewritten")
            members = {member.suffix: member for member in sample.members}
            contents = []
            for suffix in MEMBER_SUFFIXES:
                member = members.get(suffix)
                if member is None:
                    return f"{label}, {sample_name(entry)}: member {entry.key}.{suffix} is missing"
                if member.offset + member.size > size:
                    return f"{label}, {sample_name(entry)}: member {member.name} is cut short (the shard ends inside it)"
                handle.seek(member.offset)
                data = handle.read(member.size)
                contents.append(data)
                if suffix.endswith("jpg"):
                    problem = _jpeg_problem(data)
                    if problem:
                        return f"{label}, {sample_name(entry)}: JPEG {member.name} does not decode ({problem})"
                elif suffix == "index" and (len(data) != 8 or struct.unpack("<q", data)[0] != entry.index):
                    return f"{label}, {sample_name(entry)}: member {member.name} does not hold index {entry.index}"
            if entry.stored_sha256 is not None and stored_digest(contents) != entry.stored_sha256:
                # a JPEG decoder shows most damage inside the compressed data as noise, not as an error
                return (f"{label}, {sample_name(entry)}: its bytes differ from what `prepare` wrote (damaged or "
                        "modified after it was written); run `pairgan prepare` again")
    return (f"{label}: sha256 {actual_sha256[:12]} differs from the manifest's {expected_sha256[:12]}, although every "
            "sample reads: the shard was rewritten or modified after `prepare` wrote it; run `pairgan prepare` again")
