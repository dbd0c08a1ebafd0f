"""Progress of an evaluation that makes several passes over the held-out split.

Each pass (scoring, latency, one pass per guidance weight) shows a tqdm bar on stderr when it
is a terminal. Logs that are not one (DVC's, a scheduler's) get lines instead: one every
`log_every_s` seconds inside a long pass, and one at the end of every pass, each with the
pass's rate and the time left for the whole evaluation, estimated from the images planned.
"""

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm

from components.data.batch import Batch

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `2 h 10 min`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class EvaluationProgress:
    """Counts translated images against the number planned for all passes together."""

    def __init__(self, planned_images: int, log_every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.planned_images = planned_images
        self.log_every_s = log_every_s
        self._clock = clock
        self._started = clock()
        self._done = 0

    def _eta(self) -> str:
        elapsed = self._clock() - self._started
        remaining = self.planned_images - self._done
        if remaining <= 0:
            return "evaluation done"
        if self._done == 0 or elapsed <= 0:
            return "evaluation ETA unknown"
        return f"evaluation ETA {duration(remaining * elapsed / self._done)}"

    @contextlib.contextmanager
    def step(self, name: str, images: int) -> Iterator[Callable[[int], None]]:
        """A pass of `images` images; the block calls the yielded function with each count done."""
        bar = tqdm(total=images, desc=name, unit="img", disable=None, leave=False)
        started = last_line = self._clock()
        done = 0

        def advance(count: int) -> None:
            nonlocal done, last_line
            done += count
            self._done += count
            bar.update(count)
            now = self._clock()
            if bar.disable and now - last_line >= self.log_every_s:
                last_line = now
                rate = done / max(now - started, 1e-9)
                log.info("%s: %d/%d images, %.2f images/s; %s", name, done, images, rate, self._eta())

        try:
            yield advance
        finally:
            # also when the consumer stops early (max_samples closes the batch generator)
            bar.close()
            elapsed = self._clock() - started
            log.info("%s: %d images in %s, %.2f images/s; %s", name, done, duration(elapsed),
                     done / max(elapsed, 1e-9), self._eta())

    def track(self, name: str, images: int, batches: Iterable[Batch]) -> Iterator[Batch]:
        """`batches` as they are, counted as a pass (each batch once the consumer asks for the next)."""
        with self.step(name, images) as advance:
            for batch in batches:
                yield batch
                advance(len(batch["source"]))
