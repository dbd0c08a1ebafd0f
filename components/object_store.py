"""S3 (or any S3-compatible store) for prepared data sets and locks: addresses, reads, writes.

Which store a client talks to comes from its caller: the data source passes the
`source.s3` params; everything else (prepared data sets, their locks) uses boto3's standard
configuration, so `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), `AWS_REGION`,
`AWS_MAX_ATTEMPTS` and the credential chain mean the same here as for DVC and Ray's storage.
Error messages are redacted: an endpoint given as `http://user:secret@host` never reaches a log.
"""

import hashlib
import logging
from pathlib import Path
from typing import Any

from components.redaction import redact_text

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
# botocore retries a request, not the download of a body that follows it: a connection
# dropped mid-body is retried here this often.
BODY_ATTEMPTS = 5
_CHUNK = 1 << 20


class ObjectStoreError(OSError):
    """An S3 request failed; the message names the object and holds no credentials."""


class ObjectMissing(ObjectStoreError):
    """The object (or its bucket) does not exist."""


def is_s3_uri(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(S3_SCHEME)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of s3://bucket/key; the key without leading or trailing '/'."""
    bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket (expected s3://bucket/prefix)")
    return bucket, key.strip("/")


def join_s3_uri(uri: str, relative: str) -> str:
    return uri.rstrip("/") + "/" + relative.lstrip("/")


def s3_client(endpoint_url: str | None = None, region: str | None = None, max_attempts: int | None = None) -> Any:
    """A boto3 S3 client; arguments left out come from boto3's standard configuration (environment, ~/.aws)."""
    import boto3  # imported here so local runs never pay for it
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": max_attempts}) if max_attempts else None
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _failure(uri: str, action: str, error: Exception) -> ObjectStoreError:
    from botocore.exceptions import ClientError

    message = redact_text(f"cannot {action} {uri}: {error}")
    if isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in {
        "NoSuchKey", "NoSuchBucket", "404", "NotFound",
    }:
        return ObjectMissing(message)
    return ObjectStoreError(message)


def _interrupted_body_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    return ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError


def get_bytes(client: Any, uri: str, attempts: int = BODY_ATTEMPTS) -> bytes:
    """The object's content; raises ObjectMissing or ObjectStoreError."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    interrupted = _interrupted_body_errors()
    for attempt in range(1, attempts + 1):
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except interrupted as error:
            if attempt == attempts:
                raise _failure(uri, f"get ({attempt} attempts)", error) from None
            log.warning("%s: download interrupted (%s); retrying", uri, redact_text(str(error)))
        except (BotoCoreError, ClientError) as error:
            raise _failure(uri, "get", error) from None
    raise AssertionError("unreachable: attempts >= 1")


def download_file(client: Any, uri: str, destination: Path, attempts: int = BODY_ATTEMPTS) -> str:
    """Stream the object into `destination` (created or truncated); return the SHA-256 of what was written."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    interrupted = _interrupted_body_errors()
    for attempt in range(1, attempts + 1):
        digest = hashlib.sha256()
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            with open(destination, "wb") as handle:
                for block in iter(lambda: body.read(_CHUNK), b""):
                    digest.update(block)
                    handle.write(block)
            return digest.hexdigest()
        except interrupted as error:
            if attempt == attempts:
                raise _failure(uri, f"download ({attempt} attempts)", error) from None
            log.warning("%s: download interrupted (%s); retrying", uri, redact_text(str(error)))
        except (BotoCoreError, ClientError) as error:
            raise _failure(uri, "download", error) from None
    raise AssertionError("unreachable: attempts >= 1")


def upload_file(client: Any, source: Path, uri: str) -> None:
    """Upload a local file (multipart for large ones, with boto3's retries)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    try:
        client.upload_file(str(source), bucket, key)
    except (BotoCoreError, ClientError, S3UploadFailedError) as error:
        raise _failure(uri, "upload to", error) from None


def put_bytes(client: Any, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
    except (BotoCoreError, ClientError) as error:
        raise _failure(uri, "write", error) from None


def delete_object(client: Any, uri: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as error:
        raise _failure(uri, "delete", error) from None


def list_keys(client: Any, uri: str) -> list[str]:
    """Keys under the prefix `uri` (a folder), relative to it, sorted; raises ObjectMissing for a missing bucket."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(uri)
    prefix = prefix + "/" if prefix else ""
    keys = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(item["Key"].removeprefix(prefix) for item in page.get("Contents", []))
    except (BotoCoreError, ClientError) as error:
        raise _failure(uri, "list objects under", error) from None
    return sorted(key for key in keys if key and not key.endswith("/"))
