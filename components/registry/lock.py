"""A lock on a registered model's aliases that the registry itself provides.

The gate reads `@champion`, decides, and moves it; a rollback moves it too. Two of them at
once must not interleave. The lock is a registered model named `<model>.lock`: creating a
registered model whose name exists fails (RESOURCE_ALREADY_EXISTS), and that is decided by
the registry's database (a unique name), so it is an atomic test-and-set wherever the
registry lives: a local SQLite file, a tracking server with any SQL backend, several
machines. No file system is shared, and nothing but MLflow's API is needed.

The lock model carries who holds it (host, process, a random token) and is deleted on
release. Holders keep it only for the few registry calls of a decision (never while a
model is scored). A holder that died leaves it behind: a waiter that sees the same token
for `stale_after_s` seconds (measured on its own clock, so clock skew between machines does
not matter) deletes it and competes for the lock again. Before writing, a holder confirms
that the lock is still its own (`confirm`).
"""

import logging
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from types import TracebackType

_log = logging.getLogger(__name__)

TAG_TOKEN, TAG_HOLDER, TAG_SINCE = "pairgan.lock.token", "pairgan.lock.holder", "pairgan.lock.since"
STALE_AFTER_S = 120.0  # far longer than the registry calls a holder makes (seconds at most)


class RegistryBusy(RuntimeError):
    """Another gate or rollback held the lock for longer than we were willing to wait."""


class LockLost(RuntimeError):
    """Our lock was broken as stale by another process before we were done."""


def lock_name(model_name: str) -> str:
    return f"{model_name}.lock"


class RegistryLock:
    """`with RegistryLock(client, "pairgan-generator", wait_s=600): ...` holds the model's alias lock."""

    def __init__(self, client, model_name: str, wait_s: float, stale_after_s: float = STALE_AFTER_S, poll_s: float = 0.5):
        self._client = client
        self.model_name = model_name
        self.name = lock_name(model_name)
        self.wait_s = wait_s
        self.stale_after_s = stale_after_s
        self.poll_s = poll_s
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"

    def _try_create(self) -> bool:
        from mlflow.exceptions import MlflowException

        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            self._client.create_registered_model(
                self.name,
                tags={TAG_TOKEN: self.token, TAG_HOLDER: self.holder, TAG_SINCE: since},
                description=f"Held by pairgan while it changes the aliases of {self.model_name}; deleted when done. "
                f"A lock left by a process that died is removed by the next one after {self.stale_after_s:.0f} s.",
            )
        except MlflowException as error:
            # Taken. MLflow's SQL store reads the holder's model to word its "already exists"
            # error; a holder that releases in between turns that into "not found" (two
            # registers at once met it): taken when we tried, free now, so try again.
            if error.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                return False
            raise
        return True

    def _current(self) -> dict[str, str] | None:
        """The tags of the lock as it is now, or None when nobody holds it."""
        from mlflow.exceptions import MlflowException

        try:
            return dict(self._client.get_registered_model(self.name).tags)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _delete_if_held_by(self, token: str) -> None:
        from mlflow.exceptions import MlflowException

        current = self._current()
        if current is None or current.get(TAG_TOKEN) != token:
            return
        try:
            self._client.delete_registered_model(self.name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        seen_token, seen_since = None, 0.0
        announced = False
        while not self._try_create():
            current = self._current()
            if current is None:
                continue  # released between our two calls
            token = current.get(TAG_TOKEN)
            now = time.monotonic()
            if token != seen_token:
                seen_token, seen_since = token, now
            elif now - seen_since > self.stale_after_s:
                _log.warning(
                    "removing the lock on %s held by %s since %s: it was not released for %.0f s",
                    self.model_name, current.get(TAG_HOLDER), current.get(TAG_SINCE), now - seen_since,
                )
                self._delete_if_held_by(token)
                continue
            if now >= deadline:
                raise RegistryBusy(
                    f"the registered model {self.model_name} is locked by {current.get(TAG_HOLDER, 'an unknown process')} "
                    f"since {current.get(TAG_SINCE, 'an unknown time')} (another register or rollback); "
                    f"waited {self.wait_s:.0f} s. Run again when it is done"
                )
            if not announced:
                _log.info("waiting for %s (held by %s)", self.name, current.get(TAG_HOLDER))
                announced = True
            time.sleep(self.poll_s)

    def confirm(self) -> None:
        """Raise LockLost unless we still hold the lock (call it right before writing)."""
        current = self._current()
        if current is None or current.get(TAG_TOKEN) != self.token:
            raise LockLost(
                f"the lock on {self.model_name} was taken over while this process held it "
                f"(it held it for longer than {self.stale_after_s:.0f} s); nothing was changed"
            )

    def release(self) -> None:
        self._delete_if_held_by(self.token)

    def __enter__(self) -> "RegistryLock":
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()
