"""Is the challenger really better? A paired bootstrap over the held-out images.

Both models are scored on the same images, so each image gives one difference of the gate's
metric (signed so that positive means the challenger is better). The mean difference is the
improvement; resampling the images with replacement `resamples` times gives its percentile
confidence interval. The gate promotes only when the whole interval lies above the margin:
an improvement that a different draw of held-out images could erase is noise.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# rows resampled per block: bounds the memory of a large split (block x images floats)
_BLOCK = 256


@dataclass(frozen=True)
class Comparison:
    metric: str
    samples: int  # held-out images compared
    mean_improvement: float  # in the metric's unit; > 0: the challenger is better
    interval_low: float
    interval_high: float
    confidence: float
    resamples: int
    seed: int

    def above(self, margin: float) -> bool:
        return self.interval_low > margin

    def describe(self) -> str:
        return (
            f"{self.metric} improvement {self.mean_improvement:+.4g} over {self.samples} images, "
            f"{self.confidence:.0%} interval [{self.interval_low:+.4g}, {self.interval_high:+.4g}]"
        )


def per_image_improvement(
    challenger: Sequence[Mapping[str, float]], champion: Sequence[Mapping[str, float]], metric: str, higher_is_better: bool
) -> np.ndarray:
    """The challenger's improvement on each image, paired by the rows' `index` (the manifest's sample index)."""
    challenger_by_index = {int(row["index"]): float(row[metric]) for row in challenger}
    champion_by_index = {int(row["index"]): float(row[metric]) for row in champion}
    if challenger_by_index.keys() != champion_by_index.keys():
        only = sorted(challenger_by_index.keys() ^ champion_by_index.keys())[:5]
        raise ValueError(f"the two models were scored on different images (e.g. index {only})")
    indices = sorted(challenger_by_index)
    difference = np.array([challenger_by_index[i] - champion_by_index[i] for i in indices], dtype=np.float64)
    return difference if higher_is_better else -difference


def paired_bootstrap(improvement: np.ndarray, metric: str, *, resamples: int, confidence: float, seed: int) -> Comparison:
    """Percentile interval of the mean of `improvement` (one value per image), seeded and reproducible."""
    if improvement.size == 0:
        raise ValueError("no images to compare")
    if not np.all(np.isfinite(improvement)):
        raise ValueError(f"non-finite per-image {metric} differences")
    generator = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _BLOCK):
        count = min(_BLOCK, resamples - start)
        picks = generator.integers(0, improvement.size, size=(count, improvement.size))
        means[start : start + count] = improvement[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Comparison(metric, int(improvement.size), float(improvement.mean()), float(low), float(high), confidence, resamples, seed)
