"""Writing a file so that readers see the old content or the new, never half of it.

Every writer goes through a temporary file in the destination's folder (same file system),
flushed to disk, then renamed over the destination. Temporary names are unique per process
and call, so two processes writing the same destination never share one.
"""

import contextlib
import csv
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; renamed over `path` when the block ends
    without an error, removed otherwise. For writers that want a path (PIL, torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_json_atomic(path: Path | str, payload: object, indent: int = 2, sort_keys: bool = True) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n").encode())


def copy_file_atomic(source: Path | str, destination: Path | str) -> None:
    with atomic_path(destination) as temporary:
        shutil.copyfile(source, temporary)


def write_csv_atomic(path: Path | str, fieldnames: Sequence[str], rows: Sequence[Mapping[str, object]]) -> None:
    """A header line, then one line per row (a missing value is an empty field); no rows: the header alone."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode())
