"""What a person reads on the console: one line per epoch, progress inside long loops, plain text off a terminal.

The epoch line is a list of named fields (`EPOCH_LINE_FIELDS`): a new statistic shows up in it
by adding a row there, and a statistic an epoch did not produce is left out, never printed as
nan. Inside an epoch, `StepProgress` draws a progress bar when a person is watching a terminal,
and otherwise writes a plain line every `interval_s` seconds (step/total, rate, ETA), so a long
epoch in a CI log or `dvc repro > log` is never minutes of silence.
"""

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


@dataclass(frozen=True)
class ConsoleOptions:
    """How the console of a run behaves, decided once by the command that starts it.

    verbose: show what the libraries underneath say (Ray's internals, MLflow's info lines).
    interactive: a person is watching a terminal: progress bars instead of periodic lines.
    progress_interval_s: off a terminal, seconds between two progress lines inside an epoch.
    """

    verbose: bool = False
    interactive: bool = False
    progress_interval_s: float = 30.0


@dataclass(frozen=True)
class EpochField:
    """One named statistic of the epoch line: `label` shows metrics[metric] in `format`."""

    label: str
    metric: str
    format: str = ".4f"


# The statistics the epoch line shows after the rate and the ETA, in order.
EPOCH_LINE_FIELDS: tuple[EpochField, ...] = (
    EpochField("loss G", "loss/G"),
    EpochField("loss D", "loss/D"),
    EpochField("V gap", "health/V_gap"),
    EpochField("D entropy", "health/D_entropy"),
)


def format_duration(seconds: float) -> str:
    """12.3 -> "0:12", 754 -> "12:34", 3723 -> "1:02:03"; "?" when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def epoch_line(
    epoch: int,
    epochs: int,
    seconds: float,
    images_per_s: float,
    eta_s: float,
    metrics: Mapping[str, float],
    fields: Sequence[EpochField] = EPOCH_LINE_FIELDS,
) -> str:
    """"epoch 3/10 | 2.1 s | 82.6 images/s | ETA 0:15 | loss G 44.8306 | ..." (fields absent from metrics left out)."""
    parts = [f"epoch {epoch}/{epochs}", f"{seconds:.1f} s", f"{images_per_s:.1f} images/s", f"ETA {format_duration(eta_s)}"]
    parts += [f"{field.label} {metrics[field.metric]:{field.format}}" for field in fields if field.metric in metrics]
    return " | ".join(parts)


class ProgressBar(Protocol):
    """The part of tqdm's interface used here (tqdm.tqdm and Ray's tqdm_ray both have it)."""

    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


# (description, total steps) -> a bar; e.g. a tqdm to the terminal, or Ray's tqdm_ray in a worker.
BarFactory = Callable[[str, int], ProgressBar]


class StepProgress:
    """Progress of the steps of one epoch (or any counted loop).

    With a `bar` factory it draws a bar; without one it logs "<description>: step 120/500,
    4.1 steps/s, ETA 1:35" to `logger` at most every `interval_s` seconds, the first line only
    once `interval_s` has passed, so short loops print nothing but their own summary. The rate
    is that of the steps after the first: a first step carries the warm-up (minutes of
    compilation with `compile` on), which the others do not repeat, and an ETA from it would say
    hours for an epoch of seconds; while only the first step is done, the line says so instead.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 30.0,
        bar: BarFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger, self.interval_s, self.bar_factory, self.clock = logger, interval_s, bar, clock
        self._bar: ProgressBar | None = None
        self._description, self._total, self._done = "", 0, 0
        self._started = self._last_line = 0.0
        self._first_done, self._first_done_at = 0, 0.0  # the steps of the first advance, and when

    def start(self, description: str, total: int) -> None:
        self.close()
        self._description, self._total, self._done = description, total, 0
        self._first_done, self._first_done_at = 0, 0.0
        self._started = self._last_line = self.clock()
        if self.bar_factory is not None:
            self._bar = self.bar_factory(description, total)

    def advance(self, steps: int = 1) -> None:
        self._done += steps
        if self._bar is not None:
            self._bar.update(steps)
            return
        now = self.clock()
        if not self._first_done:
            self._first_done, self._first_done_at = steps, now
        if now - self._last_line < self.interval_s or (self._total and self._done >= self._total):
            return
        self._last_line = now
        if self._done == self._first_done:  # no step after the first yet: nothing to take a rate from
            total = f"/{self._total}" if self._total else ""
            self.logger.info("%s: step %d%s took %s (the first step warms up); rate and ETA follow", self._description,
                             self._done, total, format_duration(now - self._started))
            return
        elapsed = now - self._first_done_at
        rate = (self._done - self._first_done) / elapsed if elapsed > 0 else 0.0
        if not self._total:  # a loop of unknown length: no total, no ETA
            self.logger.info("%s: step %d, %.2f steps/s", self._description, self._done, rate)
            return
        eta = (self._total - self._done) / rate if rate > 0 else float("inf")
        self.logger.info(
            "%s: step %d/%d, %.2f steps/s, ETA %s", self._description, self._done, self._total, rate,
            format_duration(eta),
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
