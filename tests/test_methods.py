"""Each method learns a tiny paired task, and its exported Translator behaves as documented."""

import pytest
import torch

from components.config.model import ModelParams
from components.config.train import TrainParams
from components.methods.translator import export_translator, load_translator, save_translator, translator_from_export
from components.training.loop import TrainingSession, run_epochs
from synthetic_pairs import SyntheticPairs, colour_transform, make_sources

SMALL_UNET = {"width": 16, "channel_multipliers": [1, 2], "attention_levels": [1], "blocks_per_level": 1}
PIX2PIX = {"name": "pix2pix", "generator": {"ngf": 8, "norm": "instance", "dropout": 0.0}, "discriminator": {"ndf": 8, "norm": "instance"}}
ATME = {"name": "atme", "generator": SMALL_UNET, "discriminator": {"ndf": 8, "norm": "instance"}, "w": {"channels": [8, 8, 8]}}
DIFFUSION_GAN = {"t_min": 5, "t_max": 50}
# DDGAN here adds a small L1 on its y0 prediction (loss.lambda_l1, an option of the product):
# a pure GAN does not converge on this tiny task within the test's few hundred steps.
DDGAN = {
    "name": "ddgan",
    "generator": SMALL_UNET,
    "discriminator": {"ndf": 8},
    "nz": 8,
    "num_steps": 2,
    "ema_decay": 0.9,
    "loss": {"lambda_l1": 1.0, "r1_gamma": 0.05, "r1_interval": 15},
    "guidance": {"p_uncond": 0.2, "weight": 0.0},
}
LEARNING = {
    "pix2pix": (PIX2PIX, 300),
    "pix2pix+diffusion_gan": ({**PIX2PIX, "diffusion_gan": DIFFUSION_GAN}, 300),
    "atme": (ATME, 200),
    "atme+diffusion_gan": ({**ATME, "diffusion_gan": DIFFUSION_GAN}, 200),
    "ddgan+guidance": (DDGAN, 200),
}
THRESHOLD = 0.12  # mean |translation - target| in [-1, 1]; untrained networks score about 0.3


def _held_out() -> tuple[torch.Tensor, torch.Tensor]:
    sources = make_sources(16, 32, seed=99)
    return sources, colour_transform(sources)


def _l1(translator: torch.nn.Module) -> float:
    sources, targets = _held_out()
    with torch.no_grad():
        return (translator(sources) - targets).abs().mean().item()


@pytest.mark.parametrize("name", list(LEARNING))
def test_method_learns_the_colour_transform(name):
    method, steps = LEARNING[name]
    data = SyntheticPairs(32, 32, 4)
    session = TrainingSession(ModelParams(image_size=32, method=method), TrainParams(epochs=100), len(data), torch.device("cpu"))
    untrained = _l1(translator_from_export(export_translator(session)))
    for batch in data.steps(steps):
        session.train_step(batch)
    translator = translator_from_export(export_translator(session))
    trained = _l1(translator)
    assert untrained > 0.25
    assert trained < THRESHOLD, f"{name}: L1 {trained:.3f} after {steps} steps (untrained {untrained:.3f})"
    if translator.supports_guidance:
        translator.guidance_weight = 0.5
        assert translator.nfe == 4
        assert _l1(translator) < THRESHOLD


def _trained_briefly(method: dict, tmp_path) -> TrainingSession:
    data = SyntheticPairs(8, 32, 4)
    session = TrainingSession(ModelParams(image_size=32, method=method), TrainParams(epochs=1), len(data), torch.device("cpu"))
    run_epochs(session, data, 1)
    return session


@pytest.mark.parametrize("method", [PIX2PIX, ATME, DDGAN], ids=["pix2pix", "atme", "ddgan"])
def test_saved_translator_reproduces_the_session_sampler(method, tmp_path):
    session = _trained_briefly(method, tmp_path)
    save_translator(tmp_path / "generator.pt", session, metadata={"manifest_checksum": "abc"})
    translator = load_translator(tmp_path / "generator.pt")
    sources, _ = _held_out()
    torch.manual_seed(7)
    expected = session.sample(sources)
    torch.manual_seed(7)
    with torch.no_grad():
        observed = translator(sources)
    assert torch.allclose(observed, expected, atol=1e-6)
    assert observed.min() >= -1 and observed.max() <= 1
    assert translator.nfe == (2 if method is DDGAN else 1)
    exported = torch.load(tmp_path / "generator.pt", weights_only=True)
    assert exported["metadata"]["manifest_checksum"] == "abc" and exported["metadata"]["step"] == 2


def test_atme_translator_uses_the_configured_constant_map(tmp_path):
    session = _trained_briefly(ATME, tmp_path)
    sampler_half = session.method.make_sampler()
    other = TrainingSession(
        ModelParams(image_size=32, method={**ATME, "test_map_logit": 3.0}), TrainParams(epochs=1), 8, torch.device("cpu")
    )
    other.load_state_dict({**session.state_dict(), "model": other.model.model_dump(mode="json")})
    assert not torch.equal(other.method.make_sampler().corruption, sampler_half.corruption)


def test_guidance_weight_cannot_be_set_on_methods_without_guidance(tmp_path):
    translator = translator_from_export(export_translator(_trained_briefly(PIX2PIX, tmp_path)))
    assert not translator.supports_guidance and translator.guidance_weight == 0.0
    with pytest.raises(ValueError, match="no guidance"):
        translator.guidance_weight = 1.0
    unguided = translator_from_export(export_translator(_trained_briefly({**DDGAN, "guidance": None}, tmp_path)))
    with pytest.raises(ValueError, match="no guidance"):
        unguided.guidance_weight = 1.0


def test_ddgan_seeded_sampling_is_reproducible_and_z_matters(tmp_path):
    translator = translator_from_export(export_translator(_trained_briefly(DDGAN, tmp_path)))
    sources, _ = _held_out()
    translator.sampler.seed = 3
    with torch.no_grad():
        first, second = translator(sources), translator(sources)
        translator.sampler.seed = 4
        third = translator(sources)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


@pytest.mark.parametrize("method", [PIX2PIX, DDGAN], ids=["pix2pix", "ddgan"])
def test_translator_exports_with_torch_export(method, tmp_path):
    translator = translator_from_export(export_translator(_trained_briefly(method, tmp_path)))
    sources, _ = _held_out()
    program = torch.export.export(translator, (sources[:2],))
    assert program.module()(sources[:2]).shape == (2, 3, 32, 32)


def test_batch_of_the_wrong_size_is_refused_with_the_param_to_fix():
    session = TrainingSession(ModelParams(image_size=64, method=PIX2PIX), TrainParams(), 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="image_size 64"):
        session.train_step(next(iter(SyntheticPairs(8, 32, 4))))
