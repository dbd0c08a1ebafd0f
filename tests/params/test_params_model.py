"""params/model.yaml and params/train.yaml: bad values, keys of another method, and the sizes that come from data.yaml."""

from pathlib import Path

import pytest
import yaml

from components.config import ParamsError, load_params
from components.config.model import ATMEParams, DDGANParams, Pix2PixParams, load_model_params
from components.config.train import TrainParams
from support.params import EXAMPLES, PARAMS, shipped, shipped_yaml, write_shipped

DATA = shipped("data")
DATA_PATH = "params/data.yaml"


def load_model(path: Path):
    return load_model_params(path, DATA, DATA_PATH)


def model_error(path: Path) -> dict[str, str]:
    with pytest.raises(ParamsError) as caught:
        load_model(path)
    assert str(caught.value).splitlines()[1].startswith(f"{path}: ")
    return dict(caught.value.problems)


def write_model(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def switched(name: str) -> dict:
    """The shipped model.yaml with only `method.name` changed, the old method's keys kept."""
    content = shipped_yaml("model")
    content["method"]["name"] = name
    return content


@pytest.mark.parametrize(("preset", "schema"), [("atme-small", ATMEParams), ("ddgan-small", DDGANParams),
                                                ("diffusion-gan-small", Pix2PixParams)])
def test_each_method_loads_from_its_preset(preset, schema):
    assert isinstance(load_model(EXAMPLES / f"{preset}.yaml").method, schema)


def test_the_model_is_built_for_the_size_data_yaml_sets(tmp_path):
    data = shipped("data", image_size=128, loader={"load_scale": 1.25})
    model = load_model_params(PARAMS / "model.yaml", data, DATA_PATH)
    assert (model.image_size, model.load_size, model.crop_margin) == (128, 160, 32)


@pytest.mark.parametrize("key", ["image_size", "load_size"])
def test_a_size_in_model_yaml_is_refused_naming_the_file_that_sets_it(tmp_path, key):
    found = model_error(write_model(tmp_path, {key: 64, **shipped_yaml("model")}))
    assert list(found) == [key] and found[key].startswith(f"the image size is set once, in {DATA_PATH}")


def test_a_key_of_another_method_says_whose_it_is_and_what_the_chosen_one_accepts(tmp_path):
    found = model_error(write_model(tmp_path, switched("atme")))
    assert found["method.generator.ngf"] == (
        "belongs to pix2pix's generator (U-Net); atme's generator (DDPM U-Net) accepts width, channel_multipliers, "
        "attention_levels, blocks_per_level, groups, attention_heads, attention_head_dim, dropout"
    )
    assert {"method.generator.max_multiplier", "method.generator.norm"} <= set(found)
    # What the new method lacks is one line per section, pointing at complete blocks.
    assert found["method.generator"].startswith("missing keys width, channel_multipliers,")
    assert found["method"].startswith("missing keys w, test_map_logit: the atme block needs every one of its keys: "
                                      "params/examples/ has complete atme blocks")


@pytest.mark.parametrize(
    ("name", "key", "owner", "accepts"),
    [
        ("pix2pix", "num_steps", "belongs to ddgan", "pix2pix accepts name, generator, discriminator, loss, diffusion_gan"),
        ("pix2pix", "w", "belongs to atme", "pix2pix accepts name"),
        ("ddgan", "test_map_logit", "belongs to atme", "ddgan accepts name, generator, discriminator, loss, num_steps"),
    ],
)
def test_a_top_level_key_of_another_method_names_its_method(tmp_path, name, key, owner, accepts):
    content = shipped_yaml("model", method={"name": name})
    content["method"][key] = 1
    reason = model_error(write_model(tmp_path, content))[f"method.{key}"]
    assert reason.startswith(owner) and accepts in reason


def test_a_key_no_method_has_is_a_spelling_mistake(tmp_path):
    content = shipped_yaml("model", method={"name": "atme"})
    content["method"]["generator"]["widht"] = 32
    assert model_error(write_model(tmp_path, content))["method.generator.widht"].startswith(
        "unknown key (check the spelling); method.generator accepts width, channel_multipliers"
    )


@pytest.mark.parametrize("name", ["pix2pix", "atme"])
def test_guidance_on_a_one_step_method_is_rejected_with_the_reason(tmp_path, name):
    content = shipped_yaml("model", method={"name": name})
    content["method"]["guidance"] = {"p_uncond": 0.1, "weight": 1.0}
    found = model_error(write_model(tmp_path, content))
    assert "guidance is not a" in found["method"] and "one call" in found["method"] and "ddgan" in found["method"]


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        ({"method": {"name": "ddgan", "num_steps": 1}}, "method.num_steps", "2 to 8"),
        ({"method": {"name": "ddgan", "num_steps": 16}}, "method.num_steps", "2 to 8"),
        ({"method": {"name": "atme", "diffusion_gan": {"t_min": 600, "t_max": 500}}}, "method.diffusion_gan", "t_min = 600"),
        ({"method": {"name": "cyclegan"}}, "method", "pix2pix, atme, ddgan"),
        ({"method": {"name": "atme", "generator": {"attention_levels": [4]}}}, "method.generator", "outside the 4 levels"),
        ({"method": {"loss": {"gan_loss": "wgan"}}}, "method.loss.gan_loss", "'vanilla', 'lsgan' or 'hinge'"),
        ({"method": {"loss": {"label_smoothing": 0.7}}}, "method.loss.label_smoothing", "less than 0.5"),
        ({"method": {"discriminator": {"n_layers": 5}}}, "", "too deep for image_size 64"),
        ({"method": {"name": "atme", "generator": {"channel_multipliers": [1, 1, 1, 1, 1, 1, 1]}}}, "", "too many for image_size"),
        ({"source_channels": 3.0}, "source_channels", "valid integer"),
    ],
)
def test_bad_model_values(tmp_path, overrides, key, reason):
    found = model_error(write_model(tmp_path, shipped_yaml("model", **overrides)))
    assert key in found, found
    assert reason in found[key]


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        ({"epochs": 0}, "epochs", "greater than 0"),
        ({"epochs": 4, "lr_schedule": {"decay_epochs": 9}}, "", "exceeds epochs"),
        ({"performance": {"autocast": "fp8"}}, "performance.autocast", "'auto', 'none' or 'bf16'"),
        ({"performance": {"compile": "yes"}}, "performance.compile", "valid boolean"),
        ({"optimizer": {"betas": [0.5, 1.5]}}, "optimizer.betas[1]", "less than 1"),
        ({"health": {"patience": 3}}, "health.patience", "unknown key"),
        ({"optimizer": {"lr_d": 1.0e-5}, "lr_schedule": {"kind": "cosine", "lr_floor": 2.0e-5}}, "", "lr_floor = 2e-05 exceeds"),
        ({"batch_size": 8.0}, "batch_size", "valid integer"),
    ],
)
def test_bad_train_values(tmp_path, overrides, key, reason):
    path = write_shipped(tmp_path, "train", **overrides)
    with pytest.raises(ParamsError) as caught:
        load_params(path, TrainParams)
    found = dict(caught.value.problems)
    assert key in found, found
    assert reason in found[key]


def test_an_empty_train_yaml_is_an_error_not_the_code_defaults(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("")
    with pytest.raises(ParamsError, match=rf"{path}: is empty"):
        load_params(path, TrainParams)
