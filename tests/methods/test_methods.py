"""Each method learns a tiny paired task, and its exported Translator behaves as documented."""

import re
import time

import pytest
import torch

from components.methods.translator import export_translator, load_translator, save_translator, translator_from_export
from components.training.loop import TrainingSession, run_epochs
from support.params import shipped
from support.synthetic_pairs import SyntheticPairs, colour_transform, make_sources, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL_UNET = {"width": 16, "channel_multipliers": [1, 2], "attention_levels": [1], "blocks_per_level": 1}
PIX2PIX = {"name": "pix2pix", "generator": {"ngf": 8, "norm": "instance", "dropout": 0.0}, "discriminator": {"ndf": 8, "norm": "instance"}}
ATME = {"name": "atme", "generator": SMALL_UNET, "discriminator": {"ndf": 8, "norm": "instance"}, "w": {"channels": [8, 8, 8]}}
DIFFUSION_GAN = {"t_min": 5, "t_max": 50}
# DDGAN here adds a small L1 on its y0 prediction (loss.lambda_l1, an option of the product):
# as a pure GAN it needs about 800 steps on this task (measured: held-out L1 0.35 -> 0.11 with
# a D of ndf 16, n_layers 2), too long for CI; with the L1 term 200 steps suffice.
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
    session = TrainingSession(shipped("model", image_size=32, method=method), shipped("train", epochs=100), len(data), torch.device("cpu"))
    untrained = _l1(translator_from_export(export_translator(session)))
    for batch in data.steps(steps):
        session.train_step(batch)
    translator = translator_from_export(export_translator(session))
    trained = _l1(translator)
    assert untrained > 0.25
    assert trained < THRESHOLD, f"{name}: L1 {trained:.3f} after {steps} steps (untrained {untrained:.3f})"
    if translator.supports_guidance:
        # Guidance trades diversity for fidelity to the condition; on a deterministic task it
        # must still translate (the unconditional branch was trained), if less tightly.
        translator.guidance_weight = 0.5
        assert translator.nfe == 4
        assert _l1(translator) < 0.2


def _trained_briefly(method: dict) -> TrainingSession:
    data = SyntheticPairs(8, 32, 4)
    session = TrainingSession(shipped("model", image_size=32, method=method), shipped("train", epochs=1), len(data), torch.device("cpu"))
    run_epochs(session, data, 1)
    return session


@pytest.mark.parametrize("method", [PIX2PIX, ATME, DDGAN], ids=["pix2pix", "atme", "ddgan"])
def test_saved_translator_reproduces_the_session_sampler(method, tmp_path):
    session = _trained_briefly(method)
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


def test_atme_translator_bakes_w_of_the_configured_constant_map():
    for logit in (0.0, 3.0):
        session = TrainingSession(
            shipped("model", image_size=32, method={**ATME, "test_map_logit": logit}), shipped("train"), 8, torch.device("cpu")
        )
        with torch.no_grad():
            expected = session.method.W(torch.full((1, 1, 2, 2), logit))  # D's map is 2 x 2 at 32 px
        assert torch.allclose(session.method.make_sampler().corruption, expected)


def test_guidance_weight_cannot_be_set_on_methods_without_guidance():
    translator = translator_from_export(export_translator(_trained_briefly(PIX2PIX)))
    assert not translator.supports_guidance and translator.guidance_weight == 0.0
    with pytest.raises(ValueError, match="no guidance"):
        translator.guidance_weight = 1.0
    unguided = translator_from_export(export_translator(_trained_briefly({**DDGAN, "guidance": None})))
    with pytest.raises(ValueError, match="no guidance"):
        unguided.guidance_weight = 1.0


def test_ddgan_seeded_sampling_is_reproducible_and_z_matters():
    translator = translator_from_export(export_translator(_trained_briefly(DDGAN)))
    sources, _ = _held_out()
    translator.sampler.seed = 3
    with torch.no_grad():
        first, second = translator(sources), translator(sources)
        translator.sampler.seed = 4
        third = translator(sources)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


@pytest.mark.parametrize("method", [PIX2PIX, DDGAN], ids=["pix2pix", "ddgan"])
def test_translator_exports_with_torch_export(method):
    translator = translator_from_export(export_translator(_trained_briefly(method)))
    sources, _ = _held_out()
    program = torch.export.export(translator, (sources[:2],))
    assert program.module()(sources[:2]).shape == (2, 3, 32, 32)


def test_the_epoch_eta_leaves_out_the_first_steps_warm_up(caplog):
    # With compile on, the run's first step compiles for minutes; the epochs after it do not.
    data = SyntheticPairs(8, 32, 4)
    session = TrainingSession(shipped("model", image_size=32, method=PIX2PIX), shipped("train", epochs=3), len(data),
                              torch.device("cpu"))
    step, steps = session.train_step, []

    def first_step_compiles(batch):
        if not steps:
            time.sleep(4.0)
        steps.append(batch)
        step(batch)

    session.train_step = first_step_compiles
    with caplog.at_level("INFO", logger="components.training.loop"):
        run_epochs(session, data, 3)
    first_line = caplog.records[0].getMessage()
    epoch_s = float(re.search(r"\| ([\d.]+) s \|", first_line).group(1))
    eta = re.search(r"ETA (\d+):(\d\d)", first_line)
    assert epoch_s >= 4.0  # the epoch's own time includes it
    assert int(eta.group(1)) * 60 + int(eta.group(2)) <= 2 * (epoch_s - 4.0) + 1  # 2 epochs left, warm-up excluded


def test_batch_of_the_wrong_size_is_refused_with_the_param_to_fix():
    session = TrainingSession(shipped("model", image_size=64, method=PIX2PIX), shipped("train"), 8, torch.device("cpu"))
    with pytest.raises(ValueError, match="image_size 64"):
        session.train_step(next(iter(SyntheticPairs(8, 32, 4))))


def test_run_epochs_logs_rate_and_eta_per_epoch(caplog):
    data = SyntheticPairs(8, 32, 4)
    session = TrainingSession(shipped("model", image_size=32, method=PIX2PIX), shipped("train", epochs=2), len(data), torch.device("cpu"))
    seen = []
    with caplog.at_level("INFO", logger="components.training.loop"):
        history = run_epochs(session, data, 2, on_epoch_end=lambda s, metrics: seen.append(s.epoch))
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and all("images/s" in line and "ETA" in line for line in lines)
    assert lines[0].startswith("epoch 1/2") and lines[1].startswith("epoch 2/2")
    assert seen == [1, 2] and len(history) == 2
    assert history[1]["lr/G"] < history[0]["lr/G"]  # linear decay over the second half
    assert run_epochs(session, data, 2) == []  # already done: nothing runs


@pytest.mark.parametrize("method", [PIX2PIX, {**ATME, "diffusion_gan": DIFFUSION_GAN}, DDGAN], ids=["pix2pix", "atme", "ddgan"])
def test_cuda_performance_paths_bf16_and_channels_last_train_on_cpu(method):
    # The CUDA defaults (bf16 autocast, channels_last) exercised on the CPU, where both exist.
    data = SyntheticPairs(8, 32, 4)
    train = shipped("train", performance={"autocast": "bf16", "channels_last": True})
    session = TrainingSession(shipped("model", image_size=32, method=method), train, len(data), torch.device("cpu"))
    assert session.autocast_dtype == torch.bfloat16 and session.channels_last
    for batch in data.steps(2):
        session.train_step(batch)
    metrics = session.end_epoch()
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    assert session.sample(batch["source"]).dtype == torch.float32


def test_loading_a_file_that_is_not_a_generator_names_the_file_and_the_problem(tmp_path):
    # The likely mistakes: a training checkpoint (state.pt) or some other file given as --model.
    session = TrainingSession(shipped("model", image_size=32, method=PIX2PIX), shipped("train"), 8, torch.device("cpu"))
    checkpoint = tmp_path / "state.pt"
    torch.save(session.state_dict(), checkpoint)
    with pytest.raises(ValueError, match=r"state\.pt: not an exported generator .*lacks sampler_state"):
        load_translator(checkpoint)
    for name, content in (("notes.pt", b"hello\n"), ("random.pt", bytes(range(256)) * 4)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}: not a pairgan generator file"):
            load_translator(tmp_path / name)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match=r"tensor\.pt: not an exported generator: it holds a Tensor"):
        load_translator(tmp_path / "tensor.pt")
