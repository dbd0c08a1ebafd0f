"""The players' phases under real DDP, in two gloo processes (no Ray start-up).

A network is all-reduced only in its own player's optimiser steps: D's gradients are never
synchronised in G's step (its parameters do not require grad there), nor G's in D's; and
both replicas end every step with the same weights.
"""

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from components.config.model import ModelParams
from components.config.train import TrainParams
from components.methods.base import unwrap
from components.training.loop import TrainingSession
from components.training.worker import DDP_OPTIONS
from support.synthetic_pairs import SyntheticPairs

ROOT = Path(__file__).resolve().parents[2]
SMALL_UNET = {"width": 8, "channel_multipliers": [1, 2], "attention_levels": [], "blocks_per_level": 1, "groups": 4,
              "attention_heads": 1, "attention_head_dim": 8, "dropout": 0.0}
LOSS = {"gan_loss": "vanilla", "label_smoothing": 0.0, "lambda_l1": 100.0, "r1_gamma": 1.0, "r1_interval": 2}
METHODS = {
    "atme+diffusion_gan": {
        "name": "atme", "generator": SMALL_UNET, "discriminator": {"ndf": 8, "n_layers": 2, "norm": "instance"},
        "w": {"channels": [8, 8, 8], "groups": 4}, "loss": LOSS, "test_map_logit": 0.0,
        "diffusion_gan": {"t_min": 5, "t_max": 50, "beta_start": 1.0e-4, "beta_end": 2.0e-2, "sigma": 0.05,
                          "t_distribution": "priority", "update_interval": 1, "ada_kimg": 100.0, "d_target": 0.6},
    },
    "ddgan": {
        "name": "ddgan", "generator": SMALL_UNET, "discriminator": {"ndf": 8, "n_layers": 2, "norm": "none"},
        "loss": LOSS, "num_steps": 2, "beta_min": 0.1, "beta_max": 20.0, "nz": 4, "ema_decay": 0.999, "guidance": None,
    },
}


def _session(method: dict) -> TrainingSession:
    model = yaml.safe_load((ROOT / "params/model.yaml").read_text())
    model.update(image_size=32, load_size=32, method=method)
    train = yaml.safe_load((ROOT / "params/train.yaml").read_text())
    wrap = functools.partial(DistributedDataParallel, **DDP_OPTIONS)  # as the Ray workers wrap
    return TrainingSession(ModelParams.model_validate(model), TrainParams.model_validate(train), 16, torch.device("cpu"),
                           wrap=wrap)


def _worker(rank: int, init_file: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for name, method in METHODS.items():
            session = _session(method)
            phase = {"now": None}
            reduced = []  # (network, phase) per all-reduced gradient bucket

            def counting_hook(network_name, bucket, reduced=reduced, phase=phase):
                reduced.append((network_name, phase["now"]))
                return default_hooks.allreduce_hook(None, bucket)  # the default: average over the group

            for network_name, network in session.method.networks().items():
                network.register_comm_hook(network_name, counting_hook)
            accumulate = session.method.accumulate_gradients

            def spied(phase_name, batch, gain, stats, accumulate=accumulate):
                phase["now"] = phase_name
                accumulate(phase_name, batch, gain, stats)

            session.method.accumulate_gradients = spied
            # Each rank its own samples, as the loaders split them.
            for batch in SyntheticPairs(16, 32, 2, seed=rank).steps(3):
                session.train_step(batch)
            weights = {network_name: torch.cat([p.detach().flatten() for p in unwrap(network).parameters()])
                       for network_name, network in session.method.networks().items()}
            results[(name, rank)] = (sorted(set(reduced)), weights)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_each_player_is_all_reduced_only_in_its_own_steps_and_replicas_stay_equal(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), results), nprocs=2, join=True)
    for name in METHODS:
        reduced, weights = results[(name, 0)]
        generator_networks = {"G", "W"} & set(weights)
        assert {phase for network, phase in reduced if network == "D"} == {"D-main", "D-reg"}, name
        assert all({phase for network_, phase in reduced if network_ == network} == {"G-main"}
                   for network in generator_networks), (name, reduced)
        other_reduced, other_weights = results[(name, 1)]
        assert other_reduced == reduced
        for network, values in weights.items():
            assert torch.equal(values, other_weights[network]), f"{name}: {network} differs between the replicas"
