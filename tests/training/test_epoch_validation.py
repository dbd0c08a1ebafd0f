"""The validation score per epoch: a fixed val subset, scored like evaluate scores the exported generator."""

import logging
from pathlib import Path

import pytest
import torch

from components.config.model import ModelParams
from components.config.train import ValidationParams
from components.data.sources import open_source
from components.data.writer import prepare_dataset
from components.evaluation.held_out import score_held_out
from components.methods.translator import export_translator, translator_from_export
from components.training.loop import TrainingSession, run_epochs
from components.training.validation import EpochValidation, guidance_metric_key
from support.params import shipped
from support.synthetic_pairs import SyntheticPairs, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

LOADER = shipped("data", loader={"backend": "torch", "load_scale": 1.125, "num_threads": 1}).loader
SMALL_UNET = {"width": 8, "channel_multipliers": [1, 2], "attention_levels": [], "blocks_per_level": 1,
              "groups": 4, "attention_heads": 1, "attention_head_dim": 8}


def tiny_model(method: dict | None = None) -> ModelParams:
    pix2pix = {"generator": {"ngf": 8, "max_multiplier": 2}, "discriminator": {"ndf": 8, "n_layers": 2}}
    return shipped("model", image_size=32, load_size=36, method=method if method is not None else pix2pix)


def validation_params(**overrides) -> ValidationParams:
    return shipped("train", validation=overrides).validation


def session_for(model: ModelParams, epochs: int = 2) -> TrainingSession:
    return TrainingSession(model, shipped("train", epochs=epochs), 8, torch.device("cpu"))


def validation_for(prepared: Path, **params) -> EpochValidation:
    validation = EpochValidation.from_split(validation_params(**params), prepared, LOADER, 8, torch.device("cpu"))
    assert validation is not None
    return validation


def test_the_subset_is_the_first_val_samples_and_scores_as_the_exported_generator(prepared_builtin):
    validation = validation_for(prepared_builtin, samples=1)
    assert validation.samples == 1 and validation.batches[0]["index"].tolist() == [0]
    session = session_for(tiny_model())
    run_epochs(session, SyntheticPairs(8, 32, 4, load_size=36), 1)

    before = torch.get_rng_state()
    metrics = validation.score(session, final=False)
    assert torch.equal(torch.get_rng_state(), before)  # training draws what it would have drawn anyway
    assert set(metrics) == {"val/l1", "val/psnr", "val/ssim"}

    exported = translator_from_export(export_translator(session))
    expected = score_held_out(exported, validation.batches, torch.device("cpu")).means
    assert metrics["val/l1"] == pytest.approx(expected["l1"], rel=1e-5)
    assert metrics["val/psnr"] == pytest.approx(expected["psnr"], rel=1e-5)
    # the training networks are back in training mode (dropout on) after scoring
    assert all(module.training for module in session.method.networks().values())
    assert validation.score(session, final=False) == metrics  # the same images and noise every epoch


def test_validation_is_due_every_n_epochs_and_after_the_last(prepared_builtin):
    validation = validation_for(prepared_builtin, samples=2, every_epochs=2)
    assert [epoch for epoch in range(1, 6) if validation.due(epoch, 5)] == [2, 4, 5]


def test_ddgan_with_guidance_scores_every_weight_after_the_last_epoch(prepared_builtin):
    ddgan = {"name": "ddgan", "num_steps": 2, "nz": 4, "generator": SMALL_UNET,
             "discriminator": {"ndf": 8, "n_layers": 2, "norm": "none"}, "guidance": {"p_uncond": 0.1, "weight": 0.5}}
    validation = validation_for(prepared_builtin, samples=2, guidance_weights=[0.0, 0.5, 2.0])
    session = session_for(tiny_model(ddgan))
    assert set(validation.score(session, final=False)) == {"val/l1", "val/psnr", "val/ssim"}
    metrics = validation.score(session, final=True)
    for weight in (0.0, 0.5, 2.0):
        assert guidance_metric_key("psnr", weight) in metrics
    # the sampler trained at w = 0.5 scores exactly as the sweep's w = 0.5 (same seed, same images)
    assert metrics[guidance_metric_key("psnr", 0.5)] == pytest.approx(metrics["val/psnr"])
    assert metrics[guidance_metric_key("psnr", 2.0)] != pytest.approx(metrics["val/psnr"])


def test_no_validation_when_off_or_without_a_val_split(tmp_path, prepared_builtin, caplog):
    assert EpochValidation.from_split(validation_params(samples=0), prepared_builtin, LOADER, 8, torch.device("cpu")) is None
    params = shipped("data", source={"kind": "builtin", "path": None,
                                     "builtin": {"train_pairs": 4, "val_pairs": 0, "test_pairs": 1}},
                     image_size=32, val_fraction=0.0)
    prepare_dataset(params, open_source(params, Path.cwd()), tmp_path / "data", progress=False)
    with caplog.at_level(logging.WARNING, logger="components.training.validation"):
        assert EpochValidation.from_split(validation_params(), tmp_path / "data", LOADER, 8, torch.device("cpu")) is None
    assert "no 'val' samples" in caplog.text and "validation.samples: 0" in caplog.text


def test_validation_params_are_checked():
    with pytest.raises(ValueError, match="must not repeat"):
        validation_params(guidance_weights=[0.5, 0.5])
    with pytest.raises(ValueError):
        validation_params(every_epochs=0)
