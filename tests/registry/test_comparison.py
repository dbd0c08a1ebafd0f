"""The paired bootstrap behind the gate: pairing, direction, reproducibility, the interval."""

import numpy as np
import pytest

from components.registry.comparison import paired_bootstrap, per_image_improvement


def rows(values, indices=None):
    indices = range(len(values)) if indices is None else indices
    return [{"index": index, "psnr": value, "l1": value} for index, value in zip(indices, values)]


def test_images_are_paired_by_their_index_not_their_position():
    challenger = rows([10.0, 20.0, 30.0], indices=[2, 0, 1])
    champion = rows([19.0, 29.0, 9.0], indices=[0, 1, 2])
    assert per_image_improvement(challenger, champion, "psnr", higher_is_better=True).tolist() == [1.0, 1.0, 1.0]


def test_lower_is_better_metrics_count_a_decrease_as_improvement():
    assert per_image_improvement(rows([0.1, 0.2]), rows([0.3, 0.3]), "l1", higher_is_better=False) == pytest.approx([0.2, 0.1])


def test_models_scored_on_different_images_cannot_be_compared():
    with pytest.raises(ValueError, match="different images"):
        per_image_improvement(rows([1.0, 2.0]), rows([1.0, 2.0], indices=[0, 5]), "psnr", higher_is_better=True)


def test_the_interval_is_reproducible_from_its_seed_and_brackets_the_mean():
    improvement = np.random.default_rng(3).normal(0.5, 2.0, size=40)
    first = paired_bootstrap(improvement, "psnr", resamples=500, confidence=0.9, seed=11)
    again = paired_bootstrap(improvement, "psnr", resamples=500, confidence=0.9, seed=11)
    other = paired_bootstrap(improvement, "psnr", resamples=500, confidence=0.9, seed=12)
    assert (first.interval_low, first.interval_high) == (again.interval_low, again.interval_high)
    assert (first.interval_low, first.interval_high) != (other.interval_low, other.interval_high)
    assert first.interval_low < first.mean_improvement < first.interval_high
    assert first.mean_improvement == pytest.approx(improvement.mean())
    assert (first.samples, first.resamples, first.confidence, first.seed) == (40, 500, 0.9, 11)


def test_a_higher_confidence_gives_a_wider_interval():
    improvement = np.random.default_rng(4).normal(0.3, 1.0, size=30)
    narrow = paired_bootstrap(improvement, "psnr", resamples=2000, confidence=0.8, seed=0)
    wide = paired_bootstrap(improvement, "psnr", resamples=2000, confidence=0.99, seed=0)
    assert wide.interval_low < narrow.interval_low and wide.interval_high > narrow.interval_high


def test_the_same_improvement_on_every_image_is_significant_and_none_is_not():
    consistent = paired_bootstrap(np.full(5, 0.25), "psnr", resamples=300, confidence=0.95, seed=0)
    assert consistent.interval_low == pytest.approx(0.25) and consistent.above(0.2) and not consistent.above(0.25)
    identical = paired_bootstrap(np.zeros(5), "psnr", resamples=300, confidence=0.95, seed=0)
    assert identical.interval_low == identical.interval_high == 0.0 and not identical.above(0.0)


def test_a_large_split_is_resampled_in_blocks_without_changing_the_answer():
    improvement = np.random.default_rng(5).normal(0.0, 1.0, size=5000)
    comparison = paired_bootstrap(improvement, "psnr", resamples=1000, confidence=0.95, seed=0)
    # the standard error of a mean of 5000 unit-variance values is about 0.014
    assert comparison.interval_high - comparison.interval_low == pytest.approx(2 * 1.96 / np.sqrt(5000), rel=0.15)


def test_non_finite_differences_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        paired_bootstrap(np.array([1.0, np.nan]), "psnr", resamples=100, confidence=0.95, seed=0)
