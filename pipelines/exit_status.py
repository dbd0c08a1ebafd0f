"""The `pairgan` command's exit statuses, the same for every stage (schedulers and CI branch on them)."""

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0  # done (for register and retrain: promoted, kept the champion, or nothing new)
    FAILED = 1  # a failure the message explains (after Ray's retries, for train)
    BAD_PARAMS = 2  # invalid params or arguments: nothing was run
    DIVERGED = 3  # training diverged: recorded, never retried, never registered
