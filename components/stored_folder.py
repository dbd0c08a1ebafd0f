"""Files under a local folder or an s3:// prefix, read and written the same way for both.

Local writes are atomic (a temporary file renamed over the old one), S3 objects are written
whole, so a reader never sees a half-written file either way.
"""

import json
from pathlib import Path
from typing import Any

from components.atomic_files import copy_file_atomic, write_bytes_atomic
from components.object_store import (
    ObjectMissing,
    download_file,
    get_bytes,
    is_s3_uri,
    join_s3_uri,
    put_bytes,
    s3_client,
    upload_file,
)


def join_location(location: str, relative: str) -> str:
    """`relative` ('/'-separated) under a local folder or an s3:// prefix."""
    return join_s3_uri(location, relative) if is_s3_uri(location) else str(Path(location) / relative)


class StoredFolder:
    """Files under a local folder or an s3:// prefix, addressed by '/'-separated relative names."""

    def __init__(self, location: str, client: Any = None):
        self.location = location.rstrip("/")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def address(self, relative: str) -> str:
        return join_location(self.location, relative)

    def read_bytes(self, relative: str) -> bytes | None:
        """The file's content, or None when there is none."""
        if is_s3_uri(self.location):
            try:
                return get_bytes(self.client, self.address(relative))
            except ObjectMissing:
                return None
        try:
            return Path(self.address(relative)).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, relative: str, data: bytes) -> None:
        if is_s3_uri(self.location):
            put_bytes(self.client, self.address(relative), data)
        else:
            write_bytes_atomic(self.address(relative), data)

    def upload(self, source: Path, relative: str) -> None:
        if is_s3_uri(self.location):
            upload_file(self.client, source, self.address(relative))
        else:
            Path(self.address(relative)).parent.mkdir(parents=True, exist_ok=True)
            copy_file_atomic(source, self.address(relative))

    def download(self, relative: str, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        if is_s3_uri(self.location):
            download_file(self.client, self.address(relative), destination)
        else:
            copy_file_atomic(self.address(relative), destination)

    def exists(self, relative: str) -> bool:
        if is_s3_uri(self.location):
            from botocore.exceptions import ClientError

            bucket, _, key = self.address(relative).removeprefix("s3://").partition("/")
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError:
                return False
        return Path(self.address(relative)).is_file()

    def read_json(self, relative: str) -> dict | None:
        data = self.read_bytes(relative)
        return None if data is None else json.loads(data)

    def write_json(self, relative: str, payload: object) -> None:
        self.write_bytes(relative, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())
