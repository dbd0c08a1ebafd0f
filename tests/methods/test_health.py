"""Health metrics per step and per epoch, and the divergence detector."""

import math

import pytest
import torch

from components.training.health import DivergenceDetector, TrainingDiverged
from components.training.loop import TrainingSession
from components.training_stats import StatsCollector
from support.params import shipped
from support.synthetic_pairs import SyntheticPairs, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_PIX2PIX = {"name": "pix2pix", "generator": {"ngf": 8, "norm": "instance"}, "discriminator": {"ndf": 8, "norm": "instance"}}


def _session(health: dict, method: dict = TINY_PIX2PIX) -> TrainingSession:
    return TrainingSession(
        shipped("model", image_size=32, method=method), shipped("train", health=health), 32, torch.device("cpu")
    )


TINY_UNET = {"width": 8, "channel_multipliers": [1, 2], "attention_levels": [], "blocks_per_level": 1}
EVERY_METHOD = {
    "pix2pix+diffusion_gan": {**TINY_PIX2PIX, "diffusion_gan": {}},
    "atme": {"name": "atme", "generator": TINY_UNET, "discriminator": {"ndf": 8}, "w": {"channels": [8, 8, 8]}},
    "ddgan": {"name": "ddgan", "generator": TINY_UNET, "discriminator": {"ndf": 8}, "nz": 4, "num_steps": 2},
}


@pytest.mark.parametrize("method", list(EVERY_METHOD))
def test_every_method_reports_health_metrics_per_epoch(method):
    data = SyntheticPairs(8, 32, 4)
    session = _session({}, EVERY_METHOD[method])
    for batch in data.steps(4):
        session.train_step(batch)
    metrics = session.end_epoch()
    names = ["health/D_real", "health/D_fake", "health/V", "health/V_gap", "health/D_entropy", "health/D_accuracy",
             "grad_norm/G", "grad_norm/D", "loss/G", "loss/D"]
    if "diffusion_gan" in EVERY_METHOD[method]:
        names += ["diffusion/T", "diffusion/r_d"]
    for name in names:
        assert name in metrics and math.isfinite(metrics[name]), name
    # Absolute: V_gap is near 0 by design (ATME drives it there), where a relative tolerance
    # would ask float32 sums for more digits than they hold.
    assert metrics["health/V_gap"] == pytest.approx(metrics["health/V"] + math.log(4), abs=1e-5)
    assert 0 < metrics["health/D_entropy"] <= math.log(2) + 1e-6  # float32 at the bound
    if "diffusion_gan" in EVERY_METHOD[method]:
        assert metrics["diffusion/T"] == 5.0  # T_min until r_d pushes it


def test_detector_fires_on_a_nan_loss_at_the_next_check():
    session = _session({"check_interval": 2})
    batch = next(iter(SyntheticPairs(8, 32, 4)))
    batch["target"][0, 0, 0, 0] = float("nan")  # NaN L1: the G loss goes NaN
    session.train_step(batch)  # step 1: no check yet, no host sync
    with pytest.raises(TrainingDiverged, match="NaN or infinite"):
        session.train_step(batch)


def test_detector_fires_at_end_of_epoch_even_between_checks():
    session = _session({"check_interval": 1000})
    batch = next(iter(SyntheticPairs(8, 32, 4)))
    batch["source"][:] = float("inf")
    session.train_step(batch)
    with pytest.raises(TrainingDiverged) as error:
        session.end_epoch()
    assert "NaN or infinite" in error.value.reason


def _collapsed_step(loss: float, accuracy: float) -> dict[str, torch.Tensor]:
    return {"loss/D": torch.tensor(loss), "loss/G": torch.tensor(9.0), "health/D_accuracy": torch.tensor(accuracy)}


def test_detector_fires_on_a_collapsed_discriminator_after_patience_steps():
    detector = DivergenceDetector(shipped("train", health={"patience_steps": 5, "d_loss_floor": 1e-3}).health, torch.device("cpu"))
    for _ in range(4):
        detector.observe(_collapsed_step(1e-5, 1.0))
    detector.check(4)  # 4 < patience: still fine
    detector.observe(_collapsed_step(1e-5, 1.0))
    with pytest.raises(TrainingDiverged, match="below 0.001 for 5 steps"):
        detector.check(5)


def test_detector_fires_on_perfect_accuracy_alone_and_streaks_reset():
    detector = DivergenceDetector(shipped("train", health={"patience_steps": 3, "d_loss_floor": 0.0}).health, torch.device("cpu"))
    for accuracy in (1.0, 1.0, 0.9, 1.0, 1.0):  # the 0.9 breaks the streak
        detector.observe(_collapsed_step(0.3, accuracy))
    detector.check(5)
    detector.observe(_collapsed_step(0.3, 1.0))
    with pytest.raises(TrainingDiverged, match="every patch correctly for 3 steps"):
        detector.check(6)


def test_detector_respects_disabled_checks():
    detector = DivergenceDetector(
        shipped("train", health={"patience_steps": 1, "d_loss_floor": 0.0, "stop_on_perfect_d": False, "stop_on_nonfinite": False}).health,
        torch.device("cpu"),
    )
    detector.observe({"loss/D": torch.tensor(float("nan")), "health/D_accuracy": torch.tensor(1.0)})
    detector.check(1)


def test_a_forced_collapsed_d_in_a_real_session_stops_training():
    # Trivially separable pairs: the real target is constant +1, G is frozen by a negligible LR
    # and has no L1 pull, and D gets a large LR, so D wins outright within a few steps.
    session = TrainingSession(
        shipped("model", image_size=32, method={**TINY_PIX2PIX, "loss": {"lambda_l1": 0.0}}),
        shipped("train", health={"patience_steps": 5, "check_interval": 5, "d_loss_floor": 0.05}, optimizer={"lr_d": 0.05, "lr_g": 1e-8}),
        32,
        torch.device("cpu"),
    )
    data = SyntheticPairs(8, 32, 4)
    with pytest.raises(TrainingDiverged, match="discriminator"):
        for batch in data.steps(200):
            batch["target"] = torch.ones_like(batch["target"])
            session.train_step(batch)


def test_epoch_means_are_reduced_across_workers_with_the_given_reduce():
    other_worker = {"loss/D": (torch.tensor(30.0), 2)}  # the other rank saw D losses summing to 30 in 2 steps

    def all_reduce(packed: torch.Tensor) -> torch.Tensor:
        # packed = [sums..., counts...] in sorted name order; add the other worker's.
        extra = torch.tensor([other_worker["loss/D"][0], float(other_worker["loss/D"][1])])
        return packed + extra

    stats = StatsCollector(all_reduce)
    for value in (1.0, 2.0, 3.0):
        stats.begin_step()
        stats.report("loss/D", torch.tensor(value))
    assert stats.reduce_epoch() == {"loss/D": pytest.approx((1 + 2 + 3 + 30) / 5)}
    assert stats.reduce_epoch() == {}  # reset after each epoch
