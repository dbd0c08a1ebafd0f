"""Held-out evaluation: L1/PSNR/SSIM per image, FID/KID from injected features, latency and NFE,
the guidance-weight sweep and the sample grid.

- `image_metrics`: per-image L1, PSNR, SSIM
- `features`: the `FeatureExtractor` plug-in point, Inception-v3 loading, FID and KID
- `held_out`: scoring a translator over a split, latency, guidance sweep
- `grid`: the source | generated | target picture
"""
