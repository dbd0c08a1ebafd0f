"""Per-image reconstruction metrics between a generated image and its target.

Images arrive as the Batch contract has them (float N x C x H x W in [-1, 1]) and are compared
in [0, 1], the range PSNR and SSIM are conventionally reported in, so the numbers match what
papers and other tools print for 8-bit images.
"""

import numpy as np
import torch
from skimage.metrics import structural_similarity

# PSNR of identical images is infinite; a cap keeps metrics.json valid JSON and comparable
# (100 dB is far above any real translation: an 8-bit rounding error alone gives ~59 dB).
PSNR_CAP_DB = 100.0


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped: a generator may overshoot slightly without a final tanh."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def l1_per_image(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image, in [0, 1] units."""
    return (to_unit_range(generated) - to_unit_range(target)).abs().flatten(1).mean(1)


def psnr_per_image(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB (peak 1.0), capped at PSNR_CAP_DB."""
    mse = (to_unit_range(generated) - to_unit_range(target)).pow(2).flatten(1).mean(1).double()
    psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-30))
    return psnr.clamp(max=PSNR_CAP_DB).float()


def ssim_per_image(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5).

    Colour images are scored per channel and averaged, as scikit-image does. Images need
    both sides >= 11 pixels.
    """
    if min(generated.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(generated.shape[-2:])}")
    gen = to_unit_range(generated).cpu().numpy().astype(np.float64)
    tgt = to_unit_range(target).cpu().numpy().astype(np.float64)
    scores = [
        structural_similarity(
            g, t, channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        for g, t in zip(gen, tgt)
    ]
    return torch.tensor(scores, dtype=torch.float32)
