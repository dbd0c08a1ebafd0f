"""Start weights (`pairgan retrain`, start_from: champion): every network starts from the saved one;
networks of other model params are refused before anything trains."""

import pytest
import torch

from components.training.checkpoints import STATE_FILE
from components.training.loop import TrainingSession
from components.training.warm_start import (
    load_start_weights,
    read_start_weights,
    start_weights_mismatch,
    write_start_weights,
)
from pipelines.cli import main as pairgan
from support.params import shipped, write_shipped

TINY = {"generator": {"ngf": 8, "max_multiplier": 2}, "discriminator": {"ndf": 8, "n_layers": 2}}


def session(seed: int, **method) -> TrainingSession:
    model = shipped("model", image_size=32, method={**TINY, **method})
    return TrainingSession(model, shipped("train", seed=seed), 8, torch.device("cpu"))


def checkpoint_of(trained: TrainingSession, folder):
    folder.mkdir()
    torch.save(trained.state_dict(), folder / STATE_FILE)
    return folder


def test_every_network_starts_from_the_saved_weights_and_nothing_else_is_carried(tmp_path):
    champion = session(seed=1)
    champion.step, champion.epoch = 40, 5
    weights = tmp_path / "v1.pt"
    write_start_weights(checkpoint_of(champion, tmp_path / "checkpoint"), weights)

    fresh = session(seed=2)
    assert not torch.equal(next(fresh.method.networks()["G"].parameters()), next(champion.method.networks()["G"].parameters()))
    load_start_weights(fresh, read_start_weights(str(weights)))
    for name, network in champion.method.networks().items():
        theirs, ours = network.state_dict(), fresh.method.networks()[name].state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[key], ours[key]) for key in theirs), name
    # a new training: its own counters and schedule, not the champion's
    assert (fresh.step, fresh.epoch) == (0, 0)
    assert not fresh.optimizers["G"].state


def test_networks_of_other_model_params_are_refused_naming_the_keys(tmp_path):
    weights = tmp_path / "v1.pt"
    write_start_weights(checkpoint_of(session(seed=1), tmp_path / "checkpoint"), weights)
    wider = session(seed=1, generator={"ngf": 16, "max_multiplier": 2})
    saved = read_start_weights(str(weights))
    assert start_weights_mismatch(saved, wider.model) == ["method.generator.ngf"]
    with pytest.raises(ValueError, match="method.generator.ngf"):
        load_start_weights(wider, saved)


def test_a_file_that_is_not_start_weights_is_refused(tmp_path):
    other = tmp_path / "generator.pt"
    torch.save({"format_version": 1, "model": {}}, other)
    with pytest.raises(ValueError, match="not a start-weights file"):
        read_start_weights(str(other))


def test_train_refuses_start_weights_of_another_model_before_ray_starts(tmp_path, monkeypatch, prepared_builtin, capsys):
    weights = tmp_path / "v1.pt"
    write_start_weights(checkpoint_of(session(seed=1, generator={"ngf": 16, "max_multiplier": 2}),
                                      tmp_path / "checkpoint"), weights)
    params = tmp_path / "params"
    write_shipped(params, "data", source={"kind": "builtin", "path": None}, image_size=32)
    write_shipped(params, "model", method=TINY)
    write_shipped(params, "train", run={"storage_path": str(tmp_path / "checkpoints")})
    monkeypatch.setenv("PAIRGAN_START_WEIGHTS", str(weights))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    status = pairgan(["train", "--params-dir", str(params), "--data", str(prepared_builtin),
                      "--model-out", str(tmp_path / "generator.pt"), "--report", str(tmp_path / "train.json")])

    assert status == 2
    error = capsys.readouterr().err
    assert "PAIRGAN_START_WEIGHTS" in error and "method.generator.ngf" in error and str(params / "model.yaml") in error
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "mlflow.db").exists()
