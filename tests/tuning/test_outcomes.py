"""How a sweep reads its trials: outcomes counted apart, scores, the best trial, the table, plot and best params."""

import csv
import io
import math

import yaml

from components.tuning.outcomes import TrialRecord, best_trial, count_outcomes, summarise
from components.tuning.report import best_params, best_params_yaml, plot_png, results_csv, results_rows

NAN = math.nan
KEY = "model.method.diffusion_gan.d_target"


def epoch(number: int, psnr: float | None, **extra) -> dict:
    # Rows as Ray Tune's results table gives them: every column in every row, NaN where absent.
    return {"epoch": number, "val/psnr": NAN if psnr is None else psnr, "diverged": NAN, "loss/G": 1.0, **extra}


def record(trial_id: str, status: str, results: list[dict], value: float = 0.6, error: str | None = None) -> TrialRecord:
    return TrialRecord(trial_id, {KEY: value}, status, results, error)


def summary_of(rec: TrialRecord, scope: str = "last", epochs: int = 3):
    return summarise(rec, "val/psnr", "max", scope, epochs)


def test_each_way_a_trial_ends_is_its_own_outcome():
    finished = summary_of(record("a", "TERMINATED", [epoch(1, 10.0), epoch(2, 12.0), epoch(3, 11.0)]))
    stopped = summary_of(record("b", "TERMINATED", [epoch(1, 9.0)]))
    diverged = summary_of(record("c", "TERMINATED", [epoch(1, 10.5), {"epoch": 1, "step": 7, "diverged": 1,
                                                                        "divergence_reason": "a loss became NaN",
                                                                        "val/psnr": NAN}]))
    failed = summary_of(record("d", "ERROR", [epoch(1, 10.0)], error="RuntimeError: worker died"))
    unfinished = summary_of(record("e", "RUNNING", [epoch(1, 10.0)]))
    assert [s.outcome for s in (finished, stopped, diverged, failed, unfinished)] == [
        "finished", "stopped", "diverged", "failed", "unfinished"]
    assert diverged.reason == "a loss became NaN" and failed.reason == "RuntimeError: worker died"
    counts = count_outcomes([finished, stopped, diverged, failed, unfinished, finished])
    assert counts == {"finished": 2, "stopped": 1, "diverged": 1, "failed": 1, "unfinished": 1}


def test_scope_last_scores_the_last_epoch_and_all_the_best_one():
    rec = record("a", "TERMINATED", [epoch(1, 10.0), epoch(2, 12.0), epoch(3, 11.0)])
    last, best = summary_of(rec, "last"), summary_of(rec, "all")
    assert (last.last, last.best, last.best_epoch, last.score) == (11.0, 12.0, 2, 11.0)
    assert best.score == 12.0
    lower = summarise(record("a", "TERMINATED", [epoch(1, 0.3, **{"val/l1": 0.3}), epoch(3, 0.2, **{"val/l1": 0.2})]),
                      "val/l1", "min", "all", 3)
    assert (lower.best, lower.best_epoch) == (0.2, 3)


def test_a_resumed_trial_repeating_epochs_keeps_every_epochs_latest_values():
    results = [epoch(1, 10.0), epoch(2, 11.0),  # interrupted after epoch 2, checkpoint at 1
               epoch(2, 11.5), epoch(3, 12.0),  # resumed: epoch 2 again, then 3
               {"epoch": 3, "step": 12, "val/psnr": NAN, "diverged": NAN}]  # a finished trial restarted: no scores
    summary = summary_of(record("a", "TERMINATED", results))
    assert summary.outcome == "finished" and summary.history[2]["val/psnr"] == 11.5
    assert (summary.last, summary.epochs) == (12.0, 3)


def test_guided_trials_score_at_their_best_guidance_weight():
    final = epoch(3, 11.0, **{"val/guidance/psnr_w0": 10.0, "val/guidance/psnr_w0.5": 11.0, "val/guidance/psnr_w2": 12.5,
                              "val/guidance/l1_w2": 0.1})
    summary = summary_of(record("a", "TERMINATED", [epoch(1, 9.0), final]))
    assert (summary.guidance_weight, summary.guided, summary.score) == (2.0, 12.5, 12.5)
    assert summary.guidance == {0.0: 10.0, 0.5: 11.0, 2.0: 12.5}


def test_only_finished_trials_compete_for_best():
    finished = summary_of(record("a", "TERMINATED", [epoch(1, 10.0), epoch(3, 11.0)]))
    better_but_stopped = summary_of(record("b", "TERMINATED", [epoch(1, 15.0)]))
    assert best_trial([finished, better_but_stopped], "max") is finished
    assert best_trial([better_but_stopped], "max") is None
    worse = summary_of(record("c", "TERMINATED", [epoch(3, 10.5)]))
    assert best_trial([worse, finished], "max") is finished
    assert best_trial([worse, finished], "min") is worse


def test_table_plot_and_best_params():
    summaries = [
        summary_of(record("a", "TERMINATED", [epoch(1, 10.0), epoch(3, 11.0)], value=0.5)),
        summary_of(record("b", "TERMINATED", [epoch(1, 9.0)], value=0.7)),
        summary_of(record("c", "TERMINATED", [{"epoch": 0, "diverged": 1, "divergence_reason": "D won\nmore"}], value=0.8)),
    ]
    rows = list(csv.DictReader(io.StringIO(results_csv(results_rows(summaries, [KEY], "val/psnr")))))
    assert [(row["trial"], row["outcome"], row[KEY], row["val/psnr last"], row["best_epoch"]) for row in rows] == [
        ("a", "finished", "0.5", "11", "3"), ("b", "stopped", "0.7", "9", "1"), ("c", "diverged", "0.8", "", "")]
    assert rows[2]["reason"] == "D won"
    assert plot_png(summaries, [KEY], "val/psnr", "sweep").startswith(b"\x89PNG")

    configuration = {"model.method.diffusion_gan": {"t_min": 5, "t_max": 500}, KEY: 0.5, "train.optimizer.lr_g": 1e-4}
    document = best_params(configuration, summaries[0])
    assert document == {
        "model.yaml": {"method.diffusion_gan.t_min": 5, "method.diffusion_gan.t_max": 500, "method.diffusion_gan.d_target": 0.5},
        "train.yaml": {"optimizer.lr_g": 1e-4},
    }
    text = best_params_yaml(document, ["Best trial a"])
    assert text.startswith("# Best trial a\n") and yaml.safe_load(text) == document


def test_the_best_guidance_weight_is_adopted():
    final = epoch(3, 11.0, **{"val/guidance/psnr_w0": 10.0, "val/guidance/psnr_w1": 12.0})
    guided = summary_of(record("a", "TERMINATED", [final]))
    assert best_params({}, guided) == {"model.yaml": {"method.guidance.weight": 1.0}}


def test_a_trial_that_failed_before_any_report_has_no_score():
    summary = summary_of(record("a", "ERROR", [], error="ValueError: invalid params"))
    assert (summary.outcome, summary.score, summary.epochs) == ("failed", None, 0)
