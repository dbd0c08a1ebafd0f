"""FID and KID from image features, and the feature extractor they use.

The extractor is injected: anything mapping images (N x 3 x H x W in [-1, 1]) to features
(N x D) fits `FeatureExtractor`. The production one is Inception-v3 (`load_inception`), built
by torchvision from a weights file on disk (no download at run time). torchvision is an
optional dependency: its PyPI wheels are CUDA builds that do not load next to the CPU torch
of our CI machines, so without it (or without the weights file) FID/KID are reported as
skipped, with the reason.
"""

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class FeatureExtractor(Protocol):
    """Maps images in [-1, 1] (N x 3 x H x W) to features (N x D); `name` goes into the report."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class FeaturesUnavailable(RuntimeError):
    """The Inception extractor cannot be built; the message says why (shown in metrics.json)."""


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 up to the 2048-d average pool (the FID convention).

    Inputs are resized to 299x299 and normalised with ImageNet statistics, as torchvision's
    weights expect. Scores from torchvision's ImageNet weights are comparable between runs of
    this project, not with published FIDs, which use the TF-Inception port.
    """

    name = "inception_v3"

    def __init__(self, network: nn.Module):
        super().__init__()
        network.fc = nn.Identity()
        self.network = network.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        unit = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        resized = F.interpolate(unit, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return self.network((resized - self.mean) / self.std)


def load_inception(weights_path: Path | str, device: torch.device) -> InceptionFeatures:
    """Build Inception-v3 from a torchvision state-dict file; raises FeaturesUnavailable with the reason."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise FeaturesUnavailable(f"Inception weights not found at {weights_path}")
    try:
        from torchvision.models import inception_v3
    except (ImportError, RuntimeError) as error:
        # RuntimeError: a CUDA torchvision wheel next to a CPU torch fails while registering its ops.
        raise FeaturesUnavailable(f"torchvision is not usable here ({error})") from None
    network = inception_v3(weights=None, aux_logits=True, init_weights=False)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise FeaturesUnavailable(f"{weights_path} is not a torchvision inception_v3 state dict: {error}") from None
    return InceptionFeatures(network).to(device)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)); the right side is symmetric PSD, so a
    symmetric eigendecomposition gives it without the complex round-off of a general sqrtm.
    """
    eigvals, eigvecs = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets (N x D each, N >= 2)."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("FID needs at least 2 images per set")
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    # atleast_2d: np.cov of one feature column is a scalar
    sigma_real = np.atleast_2d(np.cov(real, rowvar=False))
    sigma_fake = np.atleast_2d(np.cov(fake, rowvar=False))
    return frechet_distance(real.mean(0), sigma_real, fake.mean(0), sigma_fake)


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the KID kernel k(a, b) = (a.b / D + 1)^3 (Binkowski et al. 2018).

    The diagonal terms k(x_i, x_i) are left out of the within-set means, which is what makes
    the estimate unbiased (it can be negative when the sets come from one distribution).
    """
    dim = x.shape[1]
    k_xx = (x @ x.T / dim + 1.0) ** 3
    k_yy = (y @ y.T / dim + 1.0) ** 3
    k_xy = (x @ y.T / dim + 1.0) ** 3
    m, n = len(x), len(y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kid_from_features(
    real: np.ndarray, fake: np.ndarray, subset_size: int, subsets: int, seed: int
) -> tuple[float, float]:
    """KID: mean and std of the unbiased MMD^2 over random subsets (each drawn without replacement)."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least 2 images per set")
    rng = np.random.default_rng(seed)
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    scores = [
        polynomial_mmd2_unbiased(
            real[rng.choice(len(real), size, replace=False)], fake[rng.choice(len(fake), size, replace=False)]
        )
        for _ in range(subsets)
    ]
    return float(np.mean(scores)), float(np.std(scores))
