"""Exclusive locks on a location (a local path or an s3:// prefix): one process works on it at a time.

    with exclusive_lock("data/prepared", purpose="pairgan prepare") as lock:
        ...                      # a second taker gets LockHeld at once, naming this holder
        lock.check()             # before committing: raises LockLost if the lock was taken over

- Local: `flock` on a sibling file `.NAME.lock`. The kernel releases it when the process dies,
  however it dies, so a crashed holder never blocks the next run. The file holds the holder's
  description and is removed on release.
- S3: a lock object `PREFIX.lock` created with a conditional put (`If-None-Match: *`), so of
  two takers exactly one succeeds. It holds the owner and a time to live; a heartbeat thread
  renews it (a conditional put on its ETag) while it is held, and a lock object older than its
  time to live, judged on the store's own clock, belongs to a crashed holder and is taken over
  (again with a conditional put, so only one taker wins). The store must support conditional
  writes (AWS S3 and MinIO do).
"""

import contextlib
import errno
import fcntl
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from components.object_store import is_s3_uri, s3_client, split_s3_uri
from components.redaction import redact_text

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 300


class LockError(RuntimeError):
    """The lock could not be taken or kept."""


class LockHeld(LockError):
    """Another process holds the lock; the message says who."""


class LockLost(LockError):
    """The lock expired and was taken over while this process believed it held it."""


def _owner() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    text = f"{info.get('owner', '?')} ({info.get('purpose', '?')}) since {info.get('since', '?')}"
    return text + (f", expires {info['expires']}" if info.get("expires") else "")


def lock_path_for(location: Path | str) -> Path:
    """The lock file that guards a local path: a hidden sibling, so the path itself can be replaced."""
    location = Path(location).absolute()
    return location.parent / f".{location.name}.lock"


class HeldLock:
    """A lock this process holds; `check()` raises LockLost when it no longer does."""

    def __init__(self, location: str, description: str):
        self.location = location
        self.description = description
        self.lost_reason: str | None = None

    def check(self) -> None:
        if self.lost_reason is not None:
            raise LockLost(f"lock on {self.location} lost: {self.lost_reason}")


@contextlib.contextmanager
def file_lock(path: Path, purpose: str, wait: bool = False) -> Iterator[HeldLock]:
    """Hold `flock` on `path` (created if needed, removed on release).

    wait: block until the holder releases it (else raise LockHeld at once).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(descriptor)
                raise
            try:
                info = json.loads(os.pread(descriptor, 4096, 0) or b"null")
            except ValueError:
                info = None
            os.close(descriptor)
            raise LockHeld(f"{path.parent / path.name.removeprefix('.').removesuffix('.lock')} is locked by "
                           f"{_describe(info)}; lock file {path}") from None
        # The previous holder removes the file as it releases it: a lock taken on a file
        # that is no longer at `path` guards nothing, so try again on the current one.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            os.close(descriptor)
            continue
        opened = os.fstat(descriptor)
        if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            break
        os.close(descriptor)
    try:
        info = {"owner": _owner(), "purpose": purpose, "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(info).encode(), 0)
        yield HeldLock(str(path), _describe(info))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(descriptor)


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class _S3Lock:
    """The lock object and its heartbeat."""

    def __init__(self, client: Any, uri: str, purpose: str, ttl_s: int):
        self.client, self.uri, self.ttl_s = client, uri, ttl_s
        self.bucket, self.key = split_s3_uri(uri)
        self.token = uuid.uuid4().hex
        self.info = {"owner": _owner(), "purpose": purpose, "ttl_s": ttl_s, "token": self.token,
                     "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.etag: str | None = None
        self.held = HeldLock(uri, _describe(self.info))
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _body(self) -> bytes:
        expires = datetime.fromtimestamp(time.time() + self.ttl_s, timezone.utc).isoformat(timespec="seconds")
        return json.dumps({**self.info, "expires": expires}).encode()

    def _put(self, **condition: str) -> str:
        response = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                          ContentType="application/json", **condition)
        return response["ETag"]

    def acquire(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        for _ in range(5):  # a holder releasing between our put and our read: try again
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except ClientError as error:
                if _error_code(error) not in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                    raise LockError(redact_text(f"cannot create lock object {self.uri}: {error}")) from None
            except BotoCoreError as error:
                raise LockError(redact_text(f"cannot create lock object {self.uri}: {error}")) from None
            try:
                current = self.client.get_object(Bucket=self.bucket, Key=self.key)
                info = json.loads(current["Body"].read() or b"null")
            except ClientError as error:
                if _error_code(error) in {"NoSuchKey", "404"}:
                    continue
                raise LockError(redact_text(f"cannot read lock object {self.uri}: {error}")) from None
            except ValueError:
                info = None
            store_now = parsedate_to_datetime(current["ResponseMetadata"]["HTTPHeaders"]["date"])
            age_s = (store_now - current["LastModified"]).total_seconds()
            ttl_s = (info or {}).get("ttl_s", self.ttl_s)
            if age_s <= ttl_s:
                raise LockHeld(f"{self.uri.removesuffix('.lock')} is locked by {_describe(info)}; lock object "
                               f"{self.uri} (if that process has died, the lock expires {ttl_s - age_s:.0f} s from now)")
            log.warning("lock %s of %s expired %.0f s ago (a crashed run); taking it over",
                        self.uri, _describe(info), age_s - ttl_s)
            try:
                self.etag = self._put(IfMatch=current["ETag"])
                break
            except ClientError as error:
                if _error_code(error) in {"PreconditionFailed", "412", "NoSuchKey", "404", "409"}:
                    continue  # another taker was faster, or the object went away: look again
                raise LockError(redact_text(f"cannot take over lock object {self.uri}: {error}")) from None
        else:
            raise LockHeld(f"{self.uri}: the lock object keeps changing; another process is taking it")
        self._heartbeat = threading.Thread(target=self._renew, name=f"lock-heartbeat {self.uri}", daemon=True)
        self._heartbeat.start()

    def _renew(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except ClientError as error:
                if _error_code(error) in {"PreconditionFailed", "412", "NoSuchKey", "404"}:
                    self.held.lost_reason = "the lock object was replaced or removed by another process"
                    log.error("lock %s lost: %s", self.uri, self.held.lost_reason)
                    return
                log.warning("lock %s: renewal failed (%s); trying again", self.uri, redact_text(str(error)))
            except BotoCoreError as error:
                log.warning("lock %s: renewal failed (%s); trying again", self.uri, redact_text(str(error)))

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self.held.lost_reason is not None:
            return  # someone else's lock object now: leave it
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except ClientError as error:
            if _error_code(error) in {"PreconditionFailed", "412"}:
                log.error("lock %s was taken over before it was released", self.uri)
            elif _error_code(error) not in {"NoSuchKey", "404"}:
                log.error("lock %s could not be released (%s); it expires after %d s",
                          self.uri, redact_text(str(error)), self.ttl_s)
        except BotoCoreError as error:
            log.error("lock %s could not be released (%s); it expires after %d s",
                      self.uri, redact_text(str(error)), self.ttl_s)


@contextlib.contextmanager
def exclusive_lock(location: Path | str, purpose: str, ttl_s: int = DEFAULT_TTL_S,
                   client: Any = None) -> Iterator[HeldLock]:
    """Hold the exclusive lock on `location` (a local path or s3://bucket/prefix) for the block.

    Raises LockHeld at once, naming the holder, when another process holds it. purpose: what
    the holder does, shown to the process that is refused. ttl_s (S3 only): how long a lock
    object outlives a holder that stopped renewing it. client: the boto3 client for an S3
    location (default: boto3's standard configuration).
    """
    if is_s3_uri(location):
        bucket, prefix = split_s3_uri(str(location))
        lock = _S3Lock(client or s3_client(), f"s3://{bucket}/{prefix + '.lock' if prefix else '.pairgan.lock'}",
                       purpose, ttl_s)
        lock.acquire()
        try:
            yield lock.held
        finally:
            lock.release()
    else:
        with file_lock(lock_path_for(location), purpose) as held:
            yield held
