"""What a job does with its run's latest checkpoint: resume, continue to more epochs, start over, or refuse."""

import pytest
import torch

from components.training.compatibility import decide_resume, job_record
from components.training.job import TrainingJob
from components.training.loop import TrainingSession
from support.params import shipped

RECORD = {"model.method.name": '"pix2pix"', "train.seed": "0", "data.checksum": '"abc"'}


def info(epoch: int, final: bool, **changed: str) -> dict:
    return {"job": {**RECORD, **changed}, "epoch": epoch, "final": final}


@pytest.mark.parametrize(
    ("saved", "epochs", "action", "words"),
    [
        (info(10, True), 20, "resume", "continuing the finished 10-epoch run in ckpt to 20 epochs"),
        (info(10, True), 10, "resume", "has already trained its 10 epochs"),
        (info(10, True), 2, "start_over", "trained 10 epochs, epochs is now 2: training a new 2-epoch model from scratch"),
        (info(10, True, **{"train.seed": "7"}), 10, "start_over", "had other params (train.seed)"),
        (info(4, False), 10, "resume", "resumed from ckpt at epoch 4 of 10"),
        (info(4, False), 6, "resume", "resumed from ckpt at epoch 4 of 6"),
    ],
)
def test_decisions(saved, epochs, action, words):
    decision = decide_resume(saved, RECORD, epochs, "ckpt")
    assert decision.action == action and words in decision.message and not decision.changes


def job(**train: object) -> TrainingJob:
    return TrainingJob(model=shipped("model", image_size=32), train=shipped("train", **train),
                       loader=shipped("data").loader, data_location="/data", data_checksum="abc", dataset_size=13)


@pytest.mark.parametrize(("changed", "key"), [({"seed": 7}, "train.seed"), ({"optimizer": {"lr_g": 5.0e-4}}, "train.optimizer.lr_g"),
                                               ({"batch_size": 4}, "train.batch_size")])
def test_what_the_weights_depend_on_makes_another_job(changed, key):
    # The records the decisions above are given: another seed must start the finished job over
    # (not answer with its model), and refuse to resume an unfinished one, naming the key.
    saved = {"job": job_record(job()), "epoch": 6, "final": True}
    assert decide_resume(saved, job_record(job(**changed)), 6, "ckpt").action == "start_over"
    unfinished = decide_resume({**saved, "final": False}, job_record(job(**changed)), 10, "ckpt")
    assert [change.key for change in unfinished.changes] == [key]


@pytest.mark.parametrize("changed", [{"epochs": 30}, {"run": {"name": "elsewhere"}}, {"health": {"patience_steps": 9}},
                                     {"performance": {"compile": True}}, {"validation": {"samples": 0}}])
def test_where_and_how_fast_a_job_runs_keeps_it_the_same_job(changed):
    assert job_record(job(**changed)) == job_record(job())


def test_an_unfinished_run_past_the_new_epochs_is_refused_naming_epochs():
    decision = decide_resume(info(6, False), RECORD, 4, "ckpt")
    assert decision.action == "refuse"
    assert [(change.key, change.checkpoint, change.now) for change in decision.changes] == [
        ("train.epochs", "6 epochs trained", "4")
    ]


def test_an_unfinished_run_with_other_params_is_refused_naming_them():
    decision = decide_resume(info(6, False, **{"train.seed": "7"}), RECORD, 10, "ckpt")
    assert decision.action == "refuse" and [change.key for change in decision.changes] == ["train.seed"]


# The epochs here end without a training step, which PyTorch warns about; a real epoch steps first.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_a_run_continued_to_more_epochs_trains_at_the_new_schedules_rate():
    # linear_decay over the last epoch of 2: the LR after epoch 2 is 0. Continued to 4 epochs
    # (decay over the last one), epoch 3 must train at the full rate, not at the saved 0.
    model = shipped("model", image_size=32, method={"generator": {"ngf": 8}, "discriminator": {"ndf": 8, "n_layers": 2}})
    schedule = {"kind": "linear_decay", "decay_epochs": 1}
    finished = TrainingSession(model, shipped("train", epochs=2, lr_schedule=schedule), 8, torch.device("cpu"))
    for _ in range(2):
        finished.end_epoch()
    assert finished.optimizers["G"].param_groups[0]["lr"] == 0.0
    continued = TrainingSession(model, shipped("train", epochs=4, lr_schedule=schedule), 8, torch.device("cpu"))
    continued.load_state_dict(finished.state_dict())
    base = shipped("train").optimizer
    assert continued.optimizers["G"].param_groups[0]["lr"] == pytest.approx(base.lr_g)
    assert continued.optimizers["D"].param_groups[0]["lr"] == pytest.approx(base.lr_d)
    assert continued.epoch == 2
