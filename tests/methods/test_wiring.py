"""What each network receives and what each phase changes, for every method, seen through spies.

A `Spy` records every forward call of G, D (and ATME's W) with its inputs, output, the phase
it ran in and D's weights at that moment, every optimiser step, and the gradients each phase
leaves. The tests then check the wiring against the references (docs/methods.md): the order of
the players' steps, what G and D are fed, the real/fake labels, ATME's memory, Diffusion-GAN's
diffusion and r_d, DDGAN's noise levels and posterior, R1's tensor, the EMA sampler, guidance.
"""

import functools
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from components.config.model import ModelParams
from components.config.train import TrainParams
from components.methods import ddgan as ddgan_module
from components.methods import pix2pix as pix2pix_module
from components.methods.atme import ATMEMemory
from components.methods.base import unwrap
from components.methods.losses import r1_penalty
from components.training.loop import TrainingSession
from support.synthetic_pairs import SyntheticPairs, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[2]
SIZE, LOAD = 32, 40

TINY_UNET = {"width": 8, "channel_multipliers": [1, 2], "attention_levels": [], "blocks_per_level": 1, "groups": 4,
             "attention_heads": 1, "attention_head_dim": 8, "dropout": 0.0}
PATCH_D = {"ndf": 8, "n_layers": 2, "norm": "instance"}
LOSS = {"gan_loss": "vanilla", "label_smoothing": 0.0, "lambda_l1": 100.0, "r1_gamma": 1.0, "r1_interval": 2}
# T fixed at 50: diffused inputs differ visibly from clean ones.
DIFFUSION = {"t_min": 50, "t_max": 50, "beta_start": 1.0e-4, "beta_end": 2.0e-2, "sigma": 0.05,
             "t_distribution": "priority", "update_interval": 4, "ada_kimg": 100.0, "d_target": 0.6}
PIX2PIX = {"name": "pix2pix", "generator": {"ngf": 8, "max_multiplier": 8, "norm": "instance", "dropout": 0.0},
           "discriminator": PATCH_D, "loss": LOSS, "diffusion_gan": None}
ATME = {"name": "atme", "generator": TINY_UNET, "discriminator": PATCH_D, "w": {"channels": [8, 8, 8], "groups": 4},
        "loss": LOSS, "test_map_logit": 0.0, "diffusion_gan": None}
DDGAN = {"name": "ddgan", "generator": TINY_UNET, "discriminator": {"ndf": 8, "n_layers": 2, "norm": "none"},
         "loss": {**LOSS, "lambda_l1": 0.0, "r1_gamma": 0.05}, "num_steps": 2, "beta_min": 0.1, "beta_max": 20.0,
         "nz": 4, "ema_decay": 0.999, "guidance": None}
METHODS = {
    "pix2pix": PIX2PIX,
    "pix2pix+diffusion_gan": {**PIX2PIX, "diffusion_gan": DIFFUSION},
    "atme": ATME,
    "atme+diffusion_gan": {**ATME, "diffusion_gan": DIFFUSION},
    "ddgan": DDGAN,
}


def _merged(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _session(method: dict, dataset_size: int = 16, train: dict | None = None) -> TrainingSession:
    """Shipped params/model.yaml and train.yaml with the given method block (in full) and overrides."""
    model = yaml.safe_load((ROOT / "params/model.yaml").read_text())
    model.update(image_size=SIZE, load_size=LOAD, method=method)
    train_params = _merged(yaml.safe_load((ROOT / "params/train.yaml").read_text()), train or {})
    return TrainingSession(ModelParams.model_validate(model), TrainParams.model_validate(train_params), dataset_size,
                           torch.device("cpu"))


def _batch(size: int = 4, seed: int = 1) -> dict:
    return next(iter(SyntheticPairs(16, SIZE, size, seed=seed, load_size=LOAD)))


def _weights(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([parameter.detach().flatten() for parameter in module.parameters()]).clone()


def _clone(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class Spy:
    """Records the forward calls of the method's networks, the phases, the optimiser steps."""

    def __init__(self, session: TrainingSession):
        self.session = session
        self.events: list[str] = []
        self.calls: list[dict] = []
        self.gains: dict[str, int] = {}
        self.gradients_after: dict[str, dict[str, bool]] = {}
        self.phase: str | None = None
        method = session.method
        self.networks = {name: unwrap(network) for name, network in method.networks().items()}
        for name, network in self.networks.items():
            network.register_forward_hook(functools.partial(self._forward, name))
        for player, optimizer in session.optimizers.items():
            optimizer.register_step_post_hook(functools.partial(self._stepped, player))
        accumulate, begin = method.accumulate_gradients, method.begin_step

        def spied_begin(batch, stats):
            self.phase = "begin"
            self.events.append("begin")
            begin(batch, stats)
            self.phase = None

        def spied_accumulate(phase, batch, gain, stats):
            # Every network's gradients are cleared first, so what is left after the phase is its own.
            for network in self.networks.values():
                for parameter in network.parameters():
                    parameter.grad = None
            self.phase = phase
            self.events.append(f"[{phase}]")
            self.gains[phase] = gain
            accumulate(phase, batch, gain, stats)
            self.gradients_after[phase] = {
                name: any(parameter.grad is not None for parameter in network.parameters())
                for name, network in self.networks.items()
            }
            self.phase = None

        method.begin_step, method.accumulate_gradients = spied_begin, spied_accumulate

    def _forward(self, name: str, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.events.append(name)
        self.calls.append({"network": name, "phase": self.phase, "inputs": tuple(_clone(a) for a in args),
                           "output": output.detach().clone(), "grad_enabled": torch.is_grad_enabled(),
                           "weights": _weights(module)})

    def _stepped(self, player: str, optimizer, args, kwargs) -> None:
        self.events.append(f"step:{player}")

    def of(self, network: str, phase: str) -> list[dict]:
        return [call for call in self.calls if call["network"] == network and call["phase"] == phase]


def _target_half(call: dict, channels: int = 3) -> torch.Tensor:
    return call["inputs"][0][:, channels:]


# --- the order of the players' steps --------------------------------------------------------

D_STEP, R1_STEP, G_STEP = ["[D-main]", "D", "D", "step:D"], ["[D-reg]", "D", "step:D"], ["[G-main]", "D", "step:G"]
ORDERS = {
    # pix2pix's optimize_parameters: one G forward, D's step, then G's step against the updated D;
    # R1 every r1_interval steps as StyleGAN2-ADA's lazy D-reg, a D step of its own.
    "pix2pix": (["begin", "G", *D_STEP, *R1_STEP, *G_STEP], ["begin", "G", *D_STEP, *G_STEP]),
    "atme": (["begin", "W", "G", *D_STEP, *R1_STEP, *G_STEP], ["begin", "W", "G", *D_STEP, *G_STEP]),
    # DDGAN's train_ddgan.py: D's step on a fresh sample (G without gradient), R1 added to that
    # same step; then G's step on another fresh sample.
    "ddgan": (
        ["begin", "[D-main]", "G", "D", "D", "[D-reg]", "D", "step:D", "[G-main]", "G", "D", "step:G"],
        ["begin", "[D-main]", "G", "D", "D", "step:D", "[G-main]", "G", "D", "step:G"],
    ),
}


@pytest.mark.parametrize("name", ["pix2pix", "atme", "ddgan"])
def test_each_method_steps_its_players_in_its_reference_order(name):
    session = _session(METHODS[name])
    spy = Spy(session)
    with_r1, without_r1 = ORDERS[name]
    session.train_step(_batch())  # step 0: an R1 step (r1_interval 2)
    assert spy.events == with_r1
    spy.events.clear()
    session.train_step(_batch(seed=2))
    assert spy.events == without_r1


@pytest.mark.parametrize("name", ["pix2pix", "atme", "ddgan"])
def test_g_plays_against_the_updated_d_and_d_against_g_before_its_step(name):
    session = _session(METHODS[name])
    spy = Spy(session)
    initial_d = _weights(spy.networks["D"])
    session.train_step(_batch())
    final_d = _weights(spy.networks["D"])
    assert not torch.equal(initial_d, final_d)
    assert all(torch.equal(call["weights"], initial_d) for call in spy.of("D", "D-main"))
    (g_main_call,) = spy.of("D", "G-main")
    assert torch.equal(g_main_call["weights"], final_d), "G's step must judge its fake with D after D's step"
    if name != "ddgan":
        # One G forward per step (begin), its fake judged by D-main (detached) and G-main alike.
        (generated,) = [call["output"] for call in spy.calls if call["network"] == "G"]
        fake_in_d_main = [call for call in spy.of("D", "D-main") if torch.equal(_target_half(call), generated)]
        assert len(fake_in_d_main) == 1
        assert torch.equal(_target_half(g_main_call), generated)


@pytest.mark.parametrize("name", list(METHODS))
def test_no_player_takes_gradients_in_the_other_players_phases(name):
    session = _session(METHODS[name])
    spy = Spy(session)
    session.train_step(_batch())
    generator_networks = {"G", "W"} & set(spy.networks)
    after = spy.gradients_after
    assert after["G-main"]["D"] is False, "D's parameters took a gradient in G-main"
    assert all(after["G-main"][network] for network in generator_networks)
    for phase in ("D-main", "D-reg"):
        assert after[phase]["D"] is True
        assert not any(after[phase][network] for network in generator_networks), f"G took a gradient in {phase}"
    # The trainable flags themselves, as DDP sees them: D frozen outside its steps.
    assert not any(parameter.requires_grad for parameter in spy.networks["D"].parameters())


def test_lazy_r1_follows_each_reference():
    # pix2pix / ATME / Diffusion-GAN: StyleGAN2-ADA's lazy regularisation, its own step with
    # gain = interval and D's Adam lr and betas scaled by interval / (interval + 1).
    train = {"optimizer": {"lr_g": 2.0e-4, "lr_d": 4.0e-4, "betas": [0.5, 0.99]}}
    session = _session(METHODS["pix2pix+diffusion_gan"], train=train)
    spy = Spy(session)
    session.train_step(_batch())
    assert spy.gains["D-reg"] == 2 and spy.events.count("step:D") == 2
    ratio = 2 / 3
    d_group, g_group = session.optimizers["D"].param_groups[0], session.optimizers["G"].param_groups[0]
    assert d_group["lr"] == pytest.approx(4.0e-4 * ratio)
    assert d_group["betas"] == pytest.approx((0.5**ratio, 0.99**ratio))
    assert g_group["lr"] == pytest.approx(2.0e-4) and g_group["betas"] == pytest.approx((0.5, 0.99))
    # DDGAN: the official code adds gamma / 2 |grad|^2, unscaled, to the same D step; no adjustment.
    session = _session(DDGAN, train=train)
    spy = Spy(session)
    session.train_step(_batch())
    assert spy.gains["D-reg"] == 1 and spy.events.count("step:D") == 1
    assert session.optimizers["D"].param_groups[0]["lr"] == pytest.approx(4.0e-4)
    assert session.optimizers["D"].param_groups[0]["betas"] == pytest.approx((0.5, 0.99))


# --- real and fake: labels and losses ------------------------------------------------------


def _spy_ddgan_draws(session: TrainingSession) -> list[dict]:
    """The (y_t, y_{t+1}) pairs DDGAN draws from the clean target, in order (D-main's first)."""
    method = session.method
    records = []
    diffuse_pair = method.diffuse_pair

    def spied(y0, t):
        y_t, y_next = diffuse_pair(y0, t)
        records.append({"t": t.clone(), "y_t": y_t.detach().clone(), "y_next": y_next.detach().clone()})
        return y_t, y_next

    method.diffuse_pair = spied
    return records


@pytest.mark.parametrize("name", ["pix2pix", "atme", "ddgan"])
def test_d_loss_labels_reals_1_and_fakes_0_and_g_loss_is_non_saturating(name):
    session = _session(METHODS[name])
    spy = Spy(session)
    draws = _spy_ddgan_draws(session) if name == "ddgan" else []
    batch = _batch()
    session.train_step(batch)
    values = session.stats.step_values
    d_main = spy.of("D", "D-main")
    real_slot = draws[0]["y_t"] if name == "ddgan" else batch["target"]
    real_part = (lambda call: call["inputs"][0][:, :3]) if name == "ddgan" else _target_half
    (real,) = [call for call in d_main if torch.equal(real_part(call), real_slot)]
    (fake,) = [call for call in d_main if call is not real]
    scale = 1.0 if name == "ddgan" else 0.5  # DDGAN's official D loss is not halved
    real_logits, fake_logits = real["output"], fake["output"]
    expected = scale * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
    assert values["loss/D"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert values["health/D_real"].item() == pytest.approx(F.softplus(-real_logits).mean().item(), rel=1e-5)
    (g_main,) = spy.of("D", "G-main")
    assert values["loss/G_gan"].item() == pytest.approx(F.softplus(-g_main["output"]).mean().item(), rel=1e-5)


def test_d_trained_alone_learns_reals_up_fakes_down_and_r_d_follows_the_reals():
    # G frozen (a negligible LR, no L1), real targets a constant colour, D with a large LR: D
    # separates them within a few steps. r_d (the mean sign of D on the diffused *reals*) must
    # then be near +1, where D's fake logits would give -1.
    method = {**PIX2PIX, "loss": {**LOSS, "lambda_l1": 0.0, "r1_gamma": 0.0},
              "diffusion_gan": {**DIFFUSION, "t_min": 5, "t_max": 10, "update_interval": 1, "ada_kimg": 0.01}}
    session = _session(method, train={"optimizer": {"lr_g": 1.0e-8, "lr_d": 1.0e-2}})
    data = SyntheticPairs(16, SIZE, 4, seed=3, load_size=LOAD)
    for batch in data.steps(30):
        batch["target"] = torch.full_like(batch["target"], 0.9)
        session.train_step(batch)
    values = {name: value.item() for name, value in session.stats.step_values.items()}
    assert values["health/D_real"] < 0.2 and values["health/D_fake"] < 0.2, values
    assert values["health/D_accuracy"] > 0.95
    assert values["diffusion/r_d"] > 0.8, "r_d must come from D's logits on the reals"
    assert values["diffusion/T"] == 10  # r_d above d_target: T went up to t_max


# --- ATME ---------------------------------------------------------------------------------


def test_atme_g_sees_only_the_corrupted_source_and_the_memory_is_read_and_written_in_the_sample_frame():
    session = _session(ATME)
    method = session.method
    memory = method.memory
    memory.maps.copy_(torch.randn(memory.maps.shape, generator=torch.Generator().manual_seed(5)))
    spy = Spy(session)
    initial_w = _weights(spy.networks["W"])
    batch = _batch(size=8, seed=4)
    assert batch["flip"].any() and not batch["flip"].all() and (batch["crop"] > 0).any()
    before = ATMEMemory(16, memory.map_size, memory.patch_stride, session.model.crop_margin, torch.device("cpu"))
    before.maps.copy_(memory.maps)
    read = before.read(batch["index"], batch["flip"], batch["crop"])
    session.train_step(batch)

    (w_call,) = [call for call in spy.calls if call["network"] == "W"]
    assert torch.equal(w_call["inputs"][0], read), "W must get this sample's stored map, cropped and flipped as the batch"
    corruption = w_call["output"]
    (g_call,) = [call for call in spy.calls if call["network"] == "G"]
    g_input, g_time = g_call["inputs"][0], g_call["inputs"][1]
    assert len(g_call["inputs"]) == 2  # (x_t, t): no clean source, no other input
    assert torch.equal(g_input, batch["source"] * (1 + corruption))
    assert not torch.equal(g_input, batch["source"])
    assert torch.allclose(g_time, corruption.mean(dim=(1, 2, 3)))
    assert not torch.equal(_weights(spy.networks["W"]), initial_w), "W learns with G (one optimiser)"
    # D sees the clean source with the fake (pix2pix's D).
    assert all(torch.equal(call["inputs"][0][:, :3], batch["source"]) for call in spy.of("D", "D-main"))

    # Written: the updated D's logits on the fake from G's step, back in the un-augmented frame;
    # every other sample's entry untouched.
    (g_main,) = spy.of("D", "G-main")
    before.write(batch["index"], batch["flip"], batch["crop"], g_main["output"])
    assert torch.equal(memory.maps, before.maps)
    assert memory.owned.sum() == len(batch["index"].unique())


# --- Diffusion-GAN ------------------------------------------------------------------------


def _spy_diffusion(session: TrainingSession, spy: Spy) -> list[dict]:
    augment = session.method.augment
    records = []
    diffuse = augment.diffuse

    def spied(y, t):
        out = diffuse(y, t)
        records.append({"phase": spy.phase, "clean": y.detach().clone(), "t": t.clone(), "diffused": out.detach().clone()})
        return out

    augment.diffuse = spied
    return records


@pytest.mark.parametrize("name", ["pix2pix+diffusion_gan", "atme+diffusion_gan"])
def test_diffusion_gan_d_sees_the_diffused_target_side_with_independent_t_for_real_and_fake(name):
    session = _session(METHODS[name])
    spy = Spy(session)
    records = _spy_diffusion(session, spy)
    batch = _batch(size=16)
    session.train_step(batch)
    augment = session.method.augment
    d_calls = spy.of("D", "D-main") + spy.of("D", "G-main")
    diffusions = [record for record in records if record["phase"] in ("D-main", "G-main")]
    assert len(diffusions) == len(d_calls) == 3
    generated = [call["output"] for call in spy.calls if call["network"] == "G"][0]
    ts = []
    for call, record in zip(d_calls, diffusions):
        pair, t = call["inputs"]
        assert torch.equal(t, record["t"]) and torch.equal(pair[:, 3:], record["diffused"])
        assert torch.equal(pair[:, :3], batch["source"])  # x stays clean
        clean, diffused = record["clean"], record["diffused"]
        assert torch.equal(clean, batch["target"]) or torch.equal(clean, generated)
        assert torch.equal(diffused[t == 0], clean[t == 0]) and (t == 0).any() and (t > 0).any()
        abar = augment.alpha_bar(t).float()[:, None, None, None]
        noise = (diffused - abar.sqrt() * clean) / ((1 - abar).sqrt() * DIFFUSION["sigma"])
        assert noise[t > 0].flatten(1).std(dim=1).sub(1).abs().max() < 0.1
        ts.append(t)
    real_clean = [record["clean"] for record in diffusions[:2]]
    assert any(torch.equal(clean, batch["target"]) for clean in real_clean)  # D-main saw the real...
    assert any(torch.equal(clean, generated) for clean in real_clean)  # ...and the fake
    assert not torch.equal(ts[0], ts[1]) and not torch.equal(ts[1], ts[2]), "each D input draws its own t"


@pytest.mark.parametrize("name", ["pix2pix", "pix2pix+diffusion_gan", "ddgan"])
def test_r1_differentiates_d_on_the_real_input_the_reference_names(name, monkeypatch):
    recorded = []

    def spied_r1(logits, real_input):
        recorded.append({"logits": logits.detach().clone(), "input": real_input, "is_leaf": real_input.is_leaf})
        return r1_penalty(logits, real_input)

    module = ddgan_module if name == "ddgan" else pix2pix_module
    monkeypatch.setattr(module, "r1_penalty", spied_r1)
    session = _session(METHODS[name])
    spy = Spy(session)
    draws = _spy_ddgan_draws(session) if name == "ddgan" else []
    batch = _batch(size=16)
    session.train_step(batch)
    (r1,) = recorded
    (d_reg,) = spy.of("D", "D-reg")
    assert r1["is_leaf"] and r1["input"].requires_grad
    assert torch.equal(r1["logits"], d_reg["output"])
    if name == "ddgan":
        # The real y_t that D-main judged (not y_{t+1}, not the condition), with D-main's
        # y_{t+1}, condition and t.
        real = draws[0]
        assert torch.equal(r1["input"].detach(), real["y_t"])
        assert torch.equal(d_reg["inputs"][0][:, :3], real["y_t"])
        assert torch.equal(d_reg["inputs"][0][:, 3:6], real["y_next"])
        assert torch.equal(d_reg["inputs"][0][:, 6:], batch["source"])
        assert torch.equal(d_reg["inputs"][1], real["t"].float())
    else:
        # The clean target: under Diffusion-GAN through the diffusion (D's input differs from it).
        assert torch.equal(r1["input"].detach(), batch["target"])
        pair = d_reg["inputs"][0]
        if name == "pix2pix":
            assert torch.equal(pair[:, 3:], batch["target"])
        else:
            t = d_reg["inputs"][1]
            assert (t > 0).any() and not torch.equal(pair[:, 3:][t > 0], batch["target"][t > 0])


# --- DDGAN ---------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = values.flatten(1)
    return flat.mean(dim=1), flat.std(dim=1)


def test_ddgan_g_denoises_the_noisier_sample_at_its_noise_level_and_d_judges_the_posterior_sample():
    # With guidance training: G and D of a phase see the same condition, dropped or not.
    session = _session({**DDGAN, "guidance": {"p_uncond": 0.5, "weight": 0.0}})
    spy = Spy(session)
    batch = _batch(size=8)
    level = 0.5
    batch["target"] = torch.full_like(batch["target"], level)
    session.train_step(batch)
    schedule = {name: value.float() for name, value in ddgan_module.vp_schedule(2, 0.1, 20.0).items()}

    def check_noise_level(images: torch.Tensor, k: torch.Tensor) -> None:
        mean, std = _per_sample(images)
        assert torch.allclose(mean, level * schedule["a_cum"][k], atol=0.07), (mean, k)
        assert torch.allclose(std, schedule["sigma_cum"][k], rtol=0.06, atol=1e-3), (std, k)

    z_by_phase = {}
    for phase in ("D-main", "G-main"):
        (g_call,) = [call for call in spy.calls if call["network"] == "G" and call["phase"] == phase]
        g_input, g_time, z = g_call["inputs"]
        z_by_phase[phase] = z
        assert g_call["grad_enabled"] == (phase == "G-main")
        d_calls = spy.of("D", phase)
        for d_call in d_calls:
            pair, t = d_call["inputs"]
            assert torch.equal(pair[:, 3:6], g_input[:, :3]), "G and D must see the same y_{t+1}"
            assert torch.equal(pair[:, 6:], g_input[:, 3:]), "G and D must see the same condition"
            assert torch.equal(t, g_time), "G is conditioned on D's t"
        condition = g_input[:, 3:]
        kept = (condition == batch["source"]).flatten(1).all(dim=1)
        dropped = (condition == 0).flatten(1).all(dim=1)
        assert (kept | dropped).all() and kept.any() and dropped.any()
        t = g_time.long()
        check_noise_level(g_input[:, :3], t + 1)  # y_{t+1}: one step noisier than y_t
        y0_hat, y_next = g_call["output"], g_input[:, :3]
        posterior_mean = schedule["coef1"][t][:, None, None, None] * y0_hat + schedule["coef2"][t][:, None, None, None] * y_next
        spread = torch.exp(0.5 * schedule["log_var"][t])[:, None, None, None]
        fakes = [call for call in d_calls if torch.allclose(call["inputs"][0][:, :3][t == 0], y0_hat[t == 0], atol=1e-6)
                 and (((call["inputs"][0][:, :3] - posterior_mean) / spread)[t > 0].flatten(1).std(dim=1) - 1).abs().max() < 0.1]
        assert len(fakes) == 1, f"{phase}: D must judge one posterior sample q(y_t | y_t+1, y0_hat)"
        if phase == "D-main":
            (real,) = [call for call in d_calls if call is not fakes[0]]
            check_noise_level(real["inputs"][0][:, :3], t)  # the real y_t
    assert not torch.equal(z_by_phase["D-main"], z_by_phase["G-main"]), "G's step draws a fresh sample"


def test_ddgan_sampler_uses_the_ema_of_g_and_the_one_step_methods_g_itself():
    session = _session(DDGAN)
    batches = SyntheticPairs(16, SIZE, 4, seed=1, load_size=LOAD).steps(4)
    for batch in batches:
        session.train_step(batch)
        if session.step == 3:
            break
    method = session.method
    sampler_weights = _weights(method.make_sampler().generator)
    assert torch.equal(sampler_weights, _weights(method.ema.shadow))
    assert not torch.equal(sampler_weights, _weights(unwrap(method.G)))
    # The 4th update: shadow <- shadow + (1 - decay) (G - shadow), decay min(0.999, (1 + 3) / (10 + 3)).
    session.train_step(next(batches))
    decay = 4 / 13
    expected = sampler_weights + (1 - decay) * (_weights(unwrap(method.G)) - sampler_weights)
    assert torch.allclose(_weights(method.make_sampler().generator), expected, atol=1e-6)
    for name in ("pix2pix", "atme"):
        session = _session(METHODS[name])
        session.train_step(_batch())
        assert torch.equal(_weights(session.method.make_sampler().generator), _weights(unwrap(session.method.G)))


def test_guidance_branches_share_z_and_weight_0_is_the_conditional_prediction():
    session = _session({**DDGAN, "guidance": {"p_uncond": 0.2, "weight": 0.0}})
    sampler = session.method.make_sampler().eval()
    generator = sampler.generator
    calls = []
    generator.register_forward_hook(lambda module, args, output: calls.append(tuple(a.clone() for a in args)))
    source = _batch()["source"]
    y = torch.randn(4, 3, SIZE, SIZE)
    t = torch.ones(4)
    z = torch.randn(4, 4)
    with torch.no_grad():
        conditional = generator(torch.cat([y, source], dim=1), t, z)
        unconditional = generator(torch.cat([y, torch.zeros_like(source)], dim=1), t, z)
        calls.clear()
        assert torch.equal(sampler.predict_y0(y, source, t, z), conditional)  # w = 0: one call, conditional
        sampler.guidance_weight = 1.5
        guided = sampler.predict_y0(y, source, t, z)
    assert torch.allclose(guided, (2.5 * conditional - 1.5 * unconditional).clamp(-1, 1), atol=1e-5)
    (both,) = calls[1:]  # the guided branches go through G as one batch
    inputs, times, latents = both
    assert torch.equal(latents[:4], latents[4:]) and torch.equal(times[:4], times[4:])
    assert torch.equal(inputs[:4, 3:], source) and torch.equal(inputs[4:, 3:], torch.zeros_like(source))
    assert torch.equal(inputs[:4, :3], inputs[4:, :3])
    # Sampling: every step's branches share z as well.
    calls.clear()
    sampler.seed = 0
    with torch.no_grad():
        sampler(source)
    assert len(calls) == sampler.num_steps and all(torch.equal(latent[:4], latent[4:]) for _, _, latent in calls)


# --- initialisation -------------------------------------------------------------------------


def test_atme_g_and_w_start_from_normal_0_002_with_zero_biases():
    method = _session(ATME).method
    for name in ("G", "W"):
        layers = [layer for layer in unwrap(method.networks()[name]).modules()
                  if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear)]
        assert layers
        for layer in layers:
            assert layer.bias is None or not layer.bias.any(), f"{name}: {layer} has a non-zero bias"
            if layer.weight.numel() >= 2000:
                assert layer.weight.std().item() == pytest.approx(0.02, rel=0.15), f"{name}: {layer}"
        norms = [layer for layer in unwrap(method.networks()[name]).modules() if isinstance(layer, torch.nn.GroupNorm)]
        assert all(torch.equal(norm.weight, torch.ones_like(norm.weight)) for norm in norms if norm.affine)


@pytest.mark.parametrize("name", ["pix2pix+diffusion_gan", "ddgan"])
def test_r1_runs_with_a_compiled_discriminator(name):
    # CUDA runs compile the networks by default, and torch.compile's autograd has no double
    # backward: D-reg must run D eagerly. aot_eager is that autograd without a C++ compiler.
    session = _session(METHODS[name])
    session.method.D = torch.compile(session.method.D, backend="aot_eager")
    session.train_step(_batch())  # step 0 runs D-reg
    assert torch.isfinite(session.stats.step_values["loss/R1"])
