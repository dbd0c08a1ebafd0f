"""What a person reads while `pairgan train` runs: one line per epoch, progress in long epochs, no noise.

What a real `pairgan train` prints off a terminal is checked on the demo, in
tests/pipeline/test_pipeline_e2e.py.
"""

import logging

import pytest

from components.console import EPOCH_LINE_FIELDS, EpochField, StepProgress, epoch_line, format_duration

# --- the epoch line and the progress lines -------------------------------------------


@pytest.mark.parametrize(("seconds", "shown"), [(0.4, "0:00"), (12.3, "0:12"), (754, "12:34"), (3723, "1:02:03"),
                                                (float("inf"), "?"), (float("nan"), "?")])
def test_durations_read_as_clock_times(seconds, shown):
    assert format_duration(seconds) == shown


def test_epoch_line_shows_rate_eta_and_each_named_field_it_has():
    metrics = {"loss/G": 12.5, "loss/D": 0.5, "health/D_entropy": 0.69, "val/psnr": 21.234}
    fields = [*EPOCH_LINE_FIELDS, EpochField("val PSNR", "val/psnr", ".2f")]
    line = epoch_line(3, 10, 2.04, 81.55, 15.2, metrics, fields)
    assert line == ("epoch 3/10 | 2.0 s | 81.5 images/s | ETA 0:15 | loss G 12.5000 | loss D 0.5000 | "
                    "D entropy 0.6900 | val PSNR 21.23")
    assert "nan" not in line and "V gap" not in line  # a statistic the epoch did not produce is left out


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_a_long_epoch_prints_step_rate_and_eta_every_interval(caplog):
    clock = FakeClock()
    progress = StepProgress(logging.getLogger("test.progress"), interval_s=30, clock=clock)
    with caplog.at_level("INFO", logger="test.progress"):
        progress.start("epoch 1/4", total=100)
        for _ in range(100):
            clock.now += 1.0  # one step a second: 100 s for the epoch
            progress.advance()
        progress.close()
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "epoch 1/4: step 30/100, 1.00 steps/s, ETA 1:10",
        "epoch 1/4: step 60/100, 1.00 steps/s, ETA 0:40",
        "epoch 1/4: step 90/100, 1.00 steps/s, ETA 0:10",
    ]


def test_the_rate_and_eta_leave_out_the_first_steps_warm_up(caplog):
    # With compile on, the first step compiles for minutes and the others take a second.
    clock = FakeClock()
    progress = StepProgress(logging.getLogger("test.progress"), interval_s=30, clock=clock)
    with caplog.at_level("INFO", logger="test.progress"):
        progress.start("epoch 1/4", total=100)
        clock.now += 180.0
        progress.advance()
        for _ in range(99):
            clock.now += 1.0
            progress.advance()
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "epoch 1/4: step 1/100 took 3:00 (the first step warms up); rate and ETA follow",
        "epoch 1/4: step 31/100, 1.00 steps/s, ETA 1:09",  # not 0.15 steps/s and ETA 7:40
        "epoch 1/4: step 61/100, 1.00 steps/s, ETA 0:39",
        "epoch 1/4: step 91/100, 1.00 steps/s, ETA 0:09",
    ]


def test_a_short_epoch_prints_no_progress_line(caplog):
    clock = FakeClock()
    progress = StepProgress(logging.getLogger("test.progress"), interval_s=30, clock=clock)
    with caplog.at_level("INFO", logger="test.progress"):
        progress.start("epoch 1/4", total=20)
        for _ in range(20):
            clock.now += 1.0
            progress.advance()
    assert caplog.records == []


def test_on_a_terminal_the_steps_go_to_a_bar_that_is_closed_after_the_epoch(caplog):
    bars = []

    class Bar:
        def __init__(self, description: str, total: int) -> None:
            self.description, self.total, self.done, self.closed = description, total, 0, False
            bars.append(self)

        def update(self, n: int = 1) -> None:
            self.done += n

        def close(self) -> None:
            self.closed = True

    clock = FakeClock()
    progress = StepProgress(logging.getLogger("test.progress"), interval_s=1, bar=Bar, clock=clock)
    with caplog.at_level("INFO", logger="test.progress"):
        for epoch in (1, 2):
            progress.start(f"epoch {epoch}/2", total=5)
            for _ in range(5):
                clock.now += 10
                progress.advance()
            progress.close()
    assert [(bar.description, bar.total, bar.done, bar.closed) for bar in bars] == [
        ("epoch 1/2", 5, 5, True), ("epoch 2/2", 5, 5, True)]
    assert caplog.records == []  # the bar replaces the periodic lines
