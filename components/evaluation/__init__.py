"""Held-out evaluation: L1/PSNR/SSIM per image, FID/KID from injected features, latency and NFE,
the guidance-weight sweep and the sample grid.

- `image_metrics`: per-image L1, PSNR, SSIM
- `features`: the `FeatureExtractor` plug-in point, Inception-v3 loading, FID and KID
- `held_out`: scoring a translator over a split, latency, guidance sweep, and all of them as one evaluation
- `progress`: progress bars and log lines for the passes of an evaluation
- `report`: the evaluation report (metrics.json, info.json, plots) evaluate writes and register reads
- `grid`: the source | generated | target picture
"""
