"""A machine that dies, for the fault tests: every process a command started, killed at once.

Killing a command's process group is not enough for that: Ray's raylet starts the training
workers outside the driver's group, and a worker that outlives the driver can still upload a
checkpoint after the "crash". Every process started from a marked environment inherits the
marker, whoever started it, so the marker finds them all (Linux: /proc/PID/environ).
"""

import os
import signal
import time
import uuid
from pathlib import Path

MARKER = "PAIRGAN_TEST_PROCESS_TREE"


def marked(environment: dict[str, str]) -> tuple[dict[str, str], str]:
    """The environment with a new marker in it, and the marker's value."""
    tag = uuid.uuid4().hex
    return {**environment, MARKER: tag}, tag


def processes_marked(tag: str) -> list[int]:
    """Live processes started with the marker (a zombie's environment reads empty: not listed)."""
    needle = f"{MARKER}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environment.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_every_process_marked(tag: str, timeout_s: float = 60) -> None:
    """SIGKILL every process started with the marker, until none is left (new ones included)."""
    deadline = time.monotonic() + timeout_s
    while pids := processes_marked(tag):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} outlived SIGKILL for {timeout_s} s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
