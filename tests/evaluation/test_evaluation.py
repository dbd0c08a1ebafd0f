"""Evaluation metrics against hand-computed values, the held-out scorer, the guidance sweep, the grid."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from components.config import ParamsError, load_params
from components.config.evaluate import EvaluateParams
from components.evaluation.features import (
    FeaturesUnavailable,
    InceptionFeatures,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    load_inception,
    polynomial_mmd2_unbiased,
)
from components.evaluation.grid import sample_grid
from components.evaluation.held_out import measure_latency, score_held_out, sweep_guidance
from components.evaluation.image_metrics import PSNR_CAP_DB, l1_per_image, psnr_per_image, ssim_per_image
from support.params import shipped

CPU = torch.device("cpu")


# ---------------------------------------------------------------- per-image metrics


def test_psnr_of_known_noise():
    # +-0.1 noise in [0, 1] units (0.2 in [-1, 1]) has MSE 0.01 exactly: PSNR = 20 dB
    target = torch.zeros(2, 3, 16, 16)
    signs = torch.randint(0, 2, target.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    psnr = psnr_per_image(target + 0.2 * signs, target)
    assert torch.allclose(psnr, torch.tensor([20.0, 20.0]), atol=1e-4)


def test_psnr_of_identical_images_is_capped_not_infinite():
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    assert psnr_per_image(image, image).item() == PSNR_CAP_DB


def test_l1_in_unit_range():
    # [-1, 1] values 0 and 0.5 are 0.5 and 0.75 in [0, 1]: |diff| = 0.25
    assert torch.allclose(l1_per_image(torch.zeros(1, 3, 12, 12), torch.full((1, 3, 12, 12), 0.5)), torch.tensor([0.25]))


def test_ssim_of_identical_images_is_one():
    image = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim_per_image(image, image), torch.ones(3), atol=1e-6)


def test_ssim_of_two_flat_images_matches_the_formula():
    # flat images have no variance: SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1), C1 = (0.01 * 1)^2
    x, y = 0.5, 0.25
    expected = (2 * x * y + 1e-4) / (x * x + y * y + 1e-4)
    generated = torch.full((1, 3, 16, 16), 2 * x - 1)
    target = torch.full((1, 3, 16, 16), 2 * y - 1)
    assert ssim_per_image(generated, target).item() == pytest.approx(expected, rel=1e-6)


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="11x11"):
        ssim_per_image(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------- FID / KID


def test_fid_of_identical_feature_sets_is_zero():
    features = np.random.default_rng(0).normal(size=(64, 8))
    assert abs(fid_from_features(features, features)) < 1e-8


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)  # 5 + 1 + 1 + 4
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, abs=1e-9)


def test_fid_of_shifted_and_scaled_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(1)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    real = rng.normal(size=(20000, 4))
    fake = shift + 2.0 * rng.normal(size=(20000, 4))
    # |shift|^2 + sum (1 - 2)^2 = 5.25 + 4
    assert fid_from_features(real, fake) == pytest.approx(9.25, rel=0.03)


def test_kid_estimator_is_the_unbiased_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(6, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    within_x = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    within_y = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    across = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / (5 * 6)
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(within_x + within_y - 2 * across, rel=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(3)
    real, same = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    kid_same, std_same = kid_from_features(real, same, subset_size=50, subsets=200, seed=0)
    # a biased (V-statistic) estimate would sit clearly above 0 here; the unbiased one straddles it
    assert abs(kid_same) < 3 * std_same / math.sqrt(200) + 1e-3
    kid_shifted, _ = kid_from_features(real, same + 1.0, subset_size=50, subsets=20, seed=0)
    assert kid_shifted > 10 * abs(kid_same)


def test_inception_wrapper_feeds_the_network_299px_imagenet_normalised_input_and_drops_fc():
    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1000)

        def forward(self, images):
            self.seen = images
            return self.fc(images.mean((2, 3)))  # replaced by Identity: the pooled features come out

    network = Recorder()
    features = InceptionFeatures(network)(torch.ones(2, 3, 16, 16))  # white in [-1, 1]
    assert network.seen.shape == (2, 3, 299, 299)
    white = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(features, white.expand(2, 3), atol=1e-5)


def test_inception_weights_missing_is_reported_not_raised_as_crash(tmp_path):
    with pytest.raises(FeaturesUnavailable, match="not found"):
        load_inception(tmp_path / "inception_v3.pt", CPU)


def test_unusable_inception_weights_or_torchvision_is_reported(tmp_path):
    weights = tmp_path / "inception_v3.pt"
    torch.save({"not": torch.zeros(1)}, weights)
    # without torchvision (our CPU machines) or with it (the file is no inception_v3 state dict)
    with pytest.raises(FeaturesUnavailable, match="torchvision"):
        load_inception(weights, CPU)


# ---------------------------------------------------------------- held-out scoring


class Halve(nn.Module):
    """Stand-in translator: the target of the test data is exactly half the source."""

    nfe = 1
    supports_guidance = False

    def forward(self, source):
        return source * 0.5


class GuidedScale(nn.Module):
    """Stand-in guided translator: w = 0 reproduces the target (source / 2), larger w drifts away."""

    nfe = 2
    supports_guidance = True

    def __init__(self):
        super().__init__()
        self.guidance_weight = 0.0

    def forward(self, source):
        return (source * 0.5 * (1.0 + self.guidance_weight)).clamp(-1, 1)


def make_batches(count=5, batch_size=2, size=16):
    generator = torch.Generator().manual_seed(0)
    batches, index = [], 0
    while index < count:
        n = min(batch_size, count - index)
        source = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
        batches.append({
            "source": source, "target": source * 0.5, "index": torch.arange(index, index + n),
            "flip": torch.zeros(n, dtype=torch.bool), "crop": torch.zeros(n, 2, dtype=torch.int64),
        })
        index += n
    return batches


class ChannelMeans:
    """Injected feature extractor: per-channel mean and std (deterministic, 6 features)."""

    name = "channel_stats"

    def __call__(self, images):
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)


def test_perfect_translator_scores_perfectly_on_every_image():
    scores = score_held_out(Halve(), make_batches(), CPU, extractor=ChannelMeans(), features=shipped("evaluate", features={"kid_subset_size": 4}).features, keep_samples=3)
    assert [row["index"] for row in scores.per_image] == [0, 1, 2, 3, 4]
    assert scores.means["l1"] == 0 and scores.means["psnr"] == PSNR_CAP_DB and scores.means["ssim"] == pytest.approx(1.0)
    assert abs(scores.means["fid"]) < 1e-8
    assert len(scores.samples) == 3 and torch.equal(scores.samples[2][1], scores.samples[2][2])


def test_max_samples_limits_the_split():
    scores = score_held_out(Halve(), make_batches(count=5), CPU, max_samples=3)
    assert len(scores.per_image) == 3 and "fid" not in scores.means


def test_a_nan_output_makes_the_scores_not_finite():
    class Broken(nn.Module):
        def forward(self, source):
            return source * float("nan")

    assert not score_held_out(Broken(), make_batches(), CPU).finite


def test_guidance_sweep_scores_each_weight_and_restores_the_models_own():
    translator = GuidedScale()
    translator.guidance_weight = 0.3
    table = sweep_guidance(translator, make_batches, [0.0, 1.0], CPU)
    assert [row["w"] for row in table] == [0.0, 1.0]
    assert table[0]["l1"] == 0 and table[1]["l1"] > 0.05
    assert translator.guidance_weight == 0.3


def test_guidance_sweep_refuses_a_translator_without_guidance():
    with pytest.raises(ValueError, match="no guidance"):
        sweep_guidance(Halve(), make_batches, [0.0], CPU)


def test_latency_reports_per_image_times():
    latency = measure_latency(Halve(), torch.zeros(4, 3, 16, 16), CPU, shipped("evaluate", latency={"warmup": 0, "repeats": 2}).latency)
    assert latency["latency_batch_size"] == 4
    assert latency["latency_ms_per_image_batch1"] > 0 and latency["latency_ms_per_image_batched"] > 0


def test_sample_grid_rows_are_source_generated_target():
    source = torch.full((3, 64, 64), -1.0)
    generated = torch.zeros(3, 64, 64)
    target = torch.ones(3, 64, 64)
    grid = sample_grid([(source, generated, target)] * 2)
    assert grid.size == (3 * 64 + 4, 14 + 2 * (64 + 2))
    row_y = 14 + 64 + 2 + 32  # middle of the second row
    assert [grid.getpixel((x, row_y)) for x in (32, 66 + 32, 132 + 32)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_sample_grid_enlarges_tiny_images_so_they_can_be_seen():
    tiny = torch.zeros(3, 16, 16)
    assert sample_grid([(tiny, tiny, tiny)]).size == (3 * 64 + 4, 14 + 64 + 2)


# ---------------------------------------------------------------- params


def test_an_empty_evaluate_params_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "evaluate.yaml"
    path.write_text("")
    with pytest.raises(ParamsError, match=rf"{path}: is empty"):
        load_params(path, EvaluateParams)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("batch_size: 0\n", "batch_size"),
        ("features:\n  kid_subset_size: 1\n", "features.kid_subset_size"),
        ("guidance_sweep:\n  weights: [0.0, -1.0]\n", "guidance_sweep"),
        ("latency:\n  repeat: 3\n", "latency.repeat"),
        ("device: tpu\n", "device"),
    ],
)
def test_bad_evaluate_params_name_file_and_key(tmp_path, text, key):
    path = tmp_path / "evaluate.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as caught:
        load_params(path, EvaluateParams)
    assert f"{path}: {key}:" in str(caught.value)
