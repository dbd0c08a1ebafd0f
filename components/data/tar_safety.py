"""Checks every shard reader runs before it reads a tar: no member may escape its folder."""

import tarfile
from pathlib import Path, PurePosixPath


class UnsafeTarError(ValueError):
    """A tar archive holds a member that could write or read outside its folder."""


def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    """Why `member` is unsafe to read, or None when it is a plain file with a relative, contained name."""
    name = member.name
    if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts or "\\" in name:
        return "path leaves the archive's folder ('..' or a backslash)"
    if not member.isfile():
        # links and devices are never part of a shard, and links are how a traversal hides
        return "not a regular file (link, device or folder)"
    return None


def check_tar_members(path: Path | str) -> None:
    """Raise `UnsafeTarError` naming the shard and every unsafe member; reads headers only."""
    problems = []
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                reason = unsafe_member_reason(member)
                if reason:
                    problems.append(f"{member.name!r}: {reason}")
    except tarfile.TarError as error:
        raise UnsafeTarError(f"{path}: not a readable tar archive: {error}") from None
    if problems:
        raise UnsafeTarError(f"{path}: refusing to read shard with unsafe members: " + "; ".join(problems))
