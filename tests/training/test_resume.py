"""Exact resume: N steps, save, load into fresh objects, M steps == N + M steps in one go, bitwise on CPU."""

import importlib
import io

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from components.methods.base import unwrap
from components.training.loop import TrainingSession
from components.training.rng import capture_rng, restore_rng
from components.training.worker import DDP_OPTIONS
from support.params import shipped
from support.synthetic_pairs import SyntheticPairs, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL_UNET = {"width": 8, "channel_multipliers": [1, 2], "attention_levels": [1], "blocks_per_level": 1}
TINY_D = {"ndf": 8, "n_layers": 2}
METHODS = {
    "pix2pix": {"name": "pix2pix", "generator": {"ngf": 8}, "discriminator": TINY_D},
    "pix2pix+diffusion_gan+r1": {
        "name": "pix2pix",
        "generator": {"ngf": 8},
        "discriminator": TINY_D,
        "diffusion_gan": {"update_interval": 2, "ada_kimg": 0.01},
        "loss": {"r1_gamma": 1.0, "r1_interval": 2},
    },
    "atme+diffusion_gan": {
        "name": "atme",
        "generator": SMALL_UNET,
        "discriminator": TINY_D,
        "w": {"channels": [8, 8, 8]},
        "diffusion_gan": {"update_interval": 2, "ada_kimg": 0.01},
    },
    "ddgan+guidance": {
        "name": "ddgan",
        "generator": SMALL_UNET,
        "discriminator": TINY_D,
        "nz": 4,
        "num_steps": 2,
        "loss": {"r1_gamma": 0.5, "r1_interval": 2},
        "guidance": {"p_uncond": 0.3},
    },
}


def _session(method: dict, device: str = "cpu", **performance) -> TrainingSession:
    model = shipped("model", image_size=32, load_size=40, method=method)
    train = shipped("train", epochs=3, lr_schedule={"kind": "linear_decay", "decay_epochs": 2}, performance=performance)
    return TrainingSession(model, train, 12, torch.device(device))


def _run(session: TrainingSession, data: SyntheticPairs, steps: int) -> None:
    # Two steps per epoch (8 of the 12 samples), so the LR schedule and epoch counters move too.
    for batch in data.steps(steps):
        session.train_step(batch)
        if session.step % 2 == 0:
            session.end_epoch()


def _flatten(state, prefix: str = "") -> dict:
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in _flatten(value, f"{prefix}{key}/").items()}
    if isinstance(state, list | tuple):
        return {k: v for i, value in enumerate(state) for k, v in _flatten(value, f"{prefix}{i}/").items()}
    return {prefix: state}


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_is_bitwise_exact(method, tmp_path):
    data_straight = SyntheticPairs(12, 32, 4, seed=1, load_size=40)
    straight = _session(METHODS[method])
    _run(straight, data_straight, 6)

    data = SyntheticPairs(12, 32, 4, seed=1, load_size=40)
    first = _session(METHODS[method])
    _run(first, data, 3)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    # Disturb every global RNG: the restore must put them back.
    torch.manual_seed(12345)
    resumed = _session(METHODS[method])
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert (resumed.step, resumed.epoch) == (3, 1)
    _run(resumed, data, 3)

    expected, observed = _flatten(straight.state_dict()), _flatten(resumed.state_dict())
    assert expected.keys() == observed.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, observed[key]), key
        else:
            assert value == observed[key], key
    source = data.batch(torch.arange(4), torch.Generator().manual_seed(0))["source"]
    torch.manual_seed(0)
    a = straight.sample(source)
    torch.manual_seed(0)
    assert torch.equal(a, resumed.sample(source))


def test_state_holds_every_part_and_loads_with_weights_only():
    session = _session(METHODS["atme+diffusion_gan"])
    _run(session, SyntheticPairs(12, 32, 4, load_size=40), 2)
    buffer = io.BytesIO()
    torch.save(session.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state["networks"]) == {"G", "D", "W"}
    assert set(state["optimizers"]) == {"G", "D"} and set(state["schedulers"]) == {"G", "D"}
    assert state["method"]["memory"]["owned"].sum() == 8  # the 8 samples seen
    assert {"p", "T", "r_d"} <= set(state["method"]["augment"])
    assert {"torch", "cuda", "numpy", "python"} == set(state["rng"])
    assert (state["step"], state["epoch"]) == (2, 1)


def test_a_checkpoint_from_a_node_with_more_gpus_restores_the_gpus_this_one_has(monkeypatch):
    # A worker sees every GPU of its node's workers (Ray shares CUDA_VISIBLE_DEVICES), so a
    # checkpoint saved on a 4-GPU node holds 4 CUDA states; resumed on a 1-GPU node, restoring
    # the other 3 would fail with "invalid device ordinal". On the CPU, spy on what is restored.
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for module in (torch.cuda, torch.cuda.random):  # set_rng_state_all calls the module's own name
        monkeypatch.setattr(module, "set_rng_state", lambda state, device: restored.append((device, state)))
    state = capture_rng()
    saved = [torch.full((16,), gpu, dtype=torch.uint8) for gpu in range(4)]
    restore_rng({**state, "cuda": saved})
    assert [device for device, _ in restored] == [0]
    assert torch.equal(restored[0][1], saved[0])


@pytest.mark.cuda
def test_a_checkpoint_from_a_node_with_more_gpus_resumes_on_this_one():
    torch.cuda.manual_seed(123)
    expected = torch.cuda.get_rng_state(0)
    state = capture_rng()
    state["cuda"] = state["cuda"] + [state["cuda"][0].clone() for _ in range(3)]  # 3 GPUs more than here
    torch.cuda.manual_seed(7)
    restore_rng(state)
    assert torch.equal(torch.cuda.get_rng_state(0), expected)


def _saved_and_loaded(session: TrainingSession, device: str = "cpu") -> dict:
    buffer = io.BytesIO()
    torch.save(session.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location=device, weights_only=True)  # as load_checkpoint loads it


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_a_resumed_run_steps_adam_as_its_own_fused_adam_switch_says(saved_fused, resumed_fused, monkeypatch):
    # A run started on the CPU and continued on a GPU has fused_adam changed by `auto`; a user
    # may change it too (a speed switch, not part of the job). load_state_dict alone keeps the
    # saved optimizer's implementation.
    data = SyntheticPairs(12, 32, 4, seed=1, load_size=40)
    first = _session(METHODS["pix2pix"], fused_adam=saved_fused)
    _run(first, data, 3)
    resumed = _session(METHODS["pix2pix"], fused_adam=resumed_fused)
    resumed.load_state_dict(_saved_and_loaded(first))
    for player, optimizer in resumed.optimizers.items():  # the moments and step counts carried over
        saved = first.optimizers[player]
        for param, saved_param in zip(optimizer.param_groups[0]["params"], saved.param_groups[0]["params"]):
            for key, value in saved.state[saved_param].items():
                assert torch.equal(optimizer.state[param][key].float(), value.float()), (player, key)
    fused_steps = []
    adam = importlib.import_module("torch.optim.adam")  # the module Adam.step picks its implementation in
    real_fused_adam = adam._fused_adam
    monkeypatch.setattr(adam, "_fused_adam", lambda *a, **k: fused_steps.append(1) or real_fused_adam(*a, **k))
    _run(resumed, data, 3)
    assert len(fused_steps) == (6 if resumed_fused else 0)  # G and D, three steps


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
def test_a_run_resumed_on_a_gpu_keeps_adams_step_counts_where_its_implementation_reads_them(fused):
    # Unfused Adam reads its step counts on the host; on the GPU, each parameter's count would be
    # read back every step. Fused Adam reads them on the GPU.
    saving = _session(METHODS["pix2pix"], "cuda", fused_adam=fused)
    _run(saving, SyntheticPairs(12, 32, 4, load_size=40), 2)
    resumed = _session(METHODS["pix2pix"], "cuda", fused_adam=fused)
    resumed.load_state_dict(_saved_and_loaded(saving, "cuda"))
    steps = {values["step"].device.type
             for optimizer in resumed.optimizers.values() for values in optimizer.state.values()}
    assert steps == {"cuda" if fused else "cpu"}


def test_loading_a_checkpoint_of_other_model_params_names_the_changed_keys():
    session = _session(METHODS["pix2pix"])
    other = _session({**METHODS["pix2pix"], "generator": {"ngf": 16}})
    with pytest.raises(ValueError, match="method.generator.ngf"):
        other.load_state_dict(session.state_dict())


def test_session_trains_ddp_wrapped_networks_and_saves_plain_state(tmp_path):
    # A one-process gloo group: enough to put every network under real DDP (the Ray tests run two).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = []

        def wrap(network: torch.nn.Module) -> torch.nn.Module:
            wrapped.append(type(network).__name__)
            return DistributedDataParallel(network, **DDP_OPTIONS)  # as the Ray workers wrap them

        method = METHODS["atme+diffusion_gan"] | {"loss": {"r1_gamma": 1.0, "r1_interval": 1}}
        model = shipped("model", image_size=32, load_size=40, method=method)
        session = TrainingSession(model, shipped("train"), 12, torch.device("cpu"), wrap=wrap)
        assert sorted(wrapped) == ["ATMEW", "DDPMUNet", "PatchGAN"]
        _run(session, SyntheticPairs(12, 32, 4, load_size=40), 2)
        state = session.state_dict()
        assert not any(key.startswith("module.") for key in state["networks"]["G"])
        plain = TrainingSession(model, shipped("train"), 12, torch.device("cpu"))
        plain.load_state_dict(state)
        assert plain.step == 2
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["pix2pix+diffusion_gan+r1", "ddgan+guidance"])
def test_workers_draw_independent_noise_from_identical_initial_weights(method):
    # Under DDP every worker runs the same session code: one seed for all would give sample k
    # of every rank the same diffusion t and noise, latent z and condition dropout.
    def first_step(rank: int) -> tuple[dict, dict]:
        model = shipped("model", image_size=32, load_size=40, method=METHODS[method])
        session = TrainingSession(model, shipped("train"), 12, torch.device("cpu"), rank=rank)
        initial = {
            name: {key: value.clone() for key, value in unwrap(network).state_dict().items()}
            for name, network in session.method.networks().items()
        }
        session.train_step(next(iter(SyntheticPairs(12, 32, 4, seed=1, load_size=40))))
        return initial, {name: value.item() for name, value in session.stats.step_values.items()}

    initial_0, values_0 = first_step(0)
    initial_1, values_1 = first_step(1)
    for name, state in initial_0.items():  # DDP starts every replica from the same weights
        assert all(torch.equal(value, initial_1[name][key]) for key, value in state.items()), name
    assert values_0["loss/D"] != values_1["loss/D"] and values_0["loss/G"] != values_1["loss/G"]
    assert first_step(1)[1] == values_1  # and each rank's draws are reproducible
