"""params/register.yaml: the MLflow registry and the champion/challenger gate."""

import re
from typing import Literal

from pydantic import Field, field_validator

from components.config.loading import StrictModel

# Registered model names become part of `models:/NAME@alias` URIs: keep them URI-safe.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# FID and KID describe a set of images, not each image: the gate's paired test needs per-image scores
_SET_METRICS = {"fid", "kid"}


class RegisterParams(StrictModel):
    model_name: str
    experiment: str
    primary_metric: Literal["l1", "psnr", "ssim"] = Field(
        description="the gate's per-image metric; its direction (lower/higher is better) is fixed per metric"
    )
    margin: float = Field(ge=0.0, description="promote only if the whole confidence interval of the improvement is above this")
    confidence: float = Field(gt=0.5, lt=1.0, description="two-sided level of the bootstrap interval")
    bootstrap_resamples: int = Field(ge=100, le=1_000_000, description="resamples of the held-out images")
    bootstrap_seed: int = Field(ge=0, description="seeds the resampling: the same scores give the same interval")
    lock_timeout_s: int = Field(
        ge=0, description="how long register and rollback wait for another one on the same model"
    )

    @field_validator("model_name", "experiment")
    @classmethod
    def _uri_safe(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, '_', '.', '-' (it becomes part of a models:/ URI)")
        if value.endswith(".lock"):
            raise ValueError("names ending in .lock are the registry lock's (see docs/evaluation.md)")
        return value

    @field_validator("primary_metric", mode="before")
    @classmethod
    def _per_image(cls, value: object) -> object:
        if value in _SET_METRICS:
            raise ValueError(
                f"{value} is a set-level metric; the gate compares per-image scores of both models "
                "(paired bootstrap), so use l1, psnr or ssim (evaluate still reports FID/KID)"
            )
        return value
