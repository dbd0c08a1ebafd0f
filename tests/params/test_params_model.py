"""params/model.yaml and params/train.yaml: the shipped defaults load, bad values fail with file, key and reason."""

from pathlib import Path

import pytest

from components.config import ParamsError, load_params
from components.config.model import ATMEParams, DDGANParams, ModelParams, Pix2PixParams
from components.config.train import TrainParams

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_params_files_load():
    model = load_params(ROOT / "params" / "model.yaml", ModelParams)
    train = load_params(ROOT / "params" / "train.yaml", TrainParams)
    assert isinstance(model.method, Pix2PixParams)
    assert train.epochs >= 1


def _error(tmp_path: Path, text: str, schema=ModelParams) -> ParamsError:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as caught:
        load_params(path, schema)
    assert str(path) in str(caught.value)
    return caught.value


def test_each_method_loads_with_its_keys(tmp_path):
    for name, schema in (("pix2pix", Pix2PixParams), ("atme", ATMEParams), ("ddgan", DDGANParams)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"image_size: 32\nmethod:\n  name: {name}\n")
        assert isinstance(load_params(path, ModelParams).method, schema)


def test_unknown_key_is_named(tmp_path):
    error = _error(tmp_path, "method:\n  name: atme\n  generator:\n    widht: 32\n")
    assert error.problems[0][0] == "method.generator.widht"
    assert "unknown key" in error.problems[0][1]


def test_key_of_another_method_is_rejected(tmp_path):
    error = _error(tmp_path, "method:\n  name: pix2pix\n  num_steps: 4\n")
    assert error.problems[0][0] == "method.num_steps"


@pytest.mark.parametrize("name", ["pix2pix", "atme"])
def test_guidance_on_a_one_step_method_is_rejected_with_the_reason(tmp_path, name):
    error = _error(tmp_path, f"method:\n  name: {name}\n  guidance:\n    weight: 1.0\n")
    key, reason = error.problems[0]
    assert key == "method"
    assert "guidance is not a" in reason and "one call" in reason and "ddgan" in reason


@pytest.mark.parametrize("steps", [0, 1, 16])
def test_bad_ddgan_t_is_rejected(tmp_path, steps):
    error = _error(tmp_path, f"method:\n  name: ddgan\n  num_steps: {steps}\n")
    assert error.problems[0][0] == "method.num_steps"
    assert "2 to 8" in error.problems[0][1]


def test_bad_diffusion_gan_t_range_is_rejected(tmp_path):
    error = _error(tmp_path, "method:\n  name: atme\n  diffusion_gan:\n    t_min: 600\n    t_max: 500\n")
    assert error.problems[0][0] == "method.diffusion_gan"
    assert "t_min = 600" in error.problems[0][1]


def test_unknown_method_lists_the_choices(tmp_path):
    error = _error(tmp_path, "method:\n  name: cyclegan\n")
    assert "pix2pix, atme, ddgan" in error.problems[0][1]


@pytest.mark.parametrize(
    "text,key,reason",
    [
        ("image_size: 48\n", "", "power of two"),
        ("image_size: 32\nload_size: 16\n", "", "smaller than image_size"),
        ("method:\n  name: atme\n  generator:\n    attention_levels: [4]\n", "method.generator", "outside the 4 levels"),
        ("method:\n  name: pix2pix\n  loss:\n    gan_loss: wgan\n", "method.loss.gan_loss", "'vanilla', 'lsgan' or 'hinge'"),
        ("method:\n  name: pix2pix\n  loss:\n    label_smoothing: 0.7\n", "method.loss.label_smoothing", "less than 0.5"),
        ("image_size: 16\nmethod:\n  name: pix2pix\n", "", "too deep for image_size 16"),
    ],
)
def test_bad_model_values(tmp_path, text, key, reason):
    error = _error(tmp_path, text)
    assert error.problems[0][0] == key
    assert reason in error.problems[0][1]


@pytest.mark.parametrize(
    "text,key,reason",
    [
        ("epochs: 0\n", "epochs", "greater than 0"),
        ("epochs: 4\nlr_schedule:\n  decay_epochs: 9\n", "", "exceeds epochs"),
        ("performance:\n  autocast: fp8\n", "performance.autocast", "'auto', 'none' or 'bf16'"),
        ("optimizer:\n  betas: [0.5, 1.5]\n", "optimizer.betas[1]", "less than 1"),
        ("health:\n  patience: 3\n", "health.patience", "unknown key"),
        ("optimizer:\n  lr_d: 1.0e-5\nlr_schedule:\n  kind: cosine\n  lr_floor: 2.0e-5\n", "", "lr_floor = 2e-05 exceeds"),
    ],
)
def test_bad_train_values(tmp_path, text, key, reason):
    error = _error(tmp_path, text, TrainParams)
    assert error.problems[0][0] == key
    assert reason in error.problems[0][1]
