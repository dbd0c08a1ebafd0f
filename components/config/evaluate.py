"""params/evaluate.yaml: how the held-out evaluation runs (also used by the register gate)."""

from typing import Literal

from pydantic import Field, model_validator

from components.config.loading import StrictModel


class FeatureParams(StrictModel):
    """FID and KID: Inception-v3 features of generated vs target images.

    The scores are computed only when `inception_weights` names an existing file (a torchvision
    `inception_v3` state dict, loaded with weights_only=True) and torchvision imports; otherwise
    metrics.json says which of the two is missing and the stage still succeeds.
    """

    inception_weights: str
    kid_subset_size: int = Field(ge=2, description="images per KID subset (capped at the split size)")
    kid_subsets: int = Field(ge=1)


class LatencyParams(StrictModel):
    """Sampling latency: warm-up calls are not timed (first-call allocation, cuDNN autotuning)."""

    warmup: int = Field(ge=0)
    repeats: int = Field(ge=1)


class GuidanceSweepParams(StrictModel):
    """Guidance weights w to evaluate without retraining (for translators that support guidance)."""

    weights: list[float]

    @model_validator(mode="after")
    def _weights_valid(self) -> "GuidanceSweepParams":
        if any(w < 0 for w in self.weights):
            raise ValueError("guidance weights must be >= 0")
        if len(set(self.weights)) != len(self.weights):
            raise ValueError("guidance weights must not repeat")
        return self


class EvaluateParams(StrictModel):
    split: str = Field(min_length=1, description="held-out split of the manifest")
    batch_size: int = Field(ge=1)
    max_samples: int | None = Field(ge=1, description="evaluate only the first N samples (None: all)")
    device: Literal["auto", "cpu", "cuda"]
    seed: int = Field(description="seeds the generator's sampling noise, so a rerun gives the same numbers")
    grid_samples: int = Field(ge=1, description="the first N samples of the split go into the sample grid")
    features: FeatureParams
    latency: LatencyParams
    guidance_sweep: GuidanceSweepParams
