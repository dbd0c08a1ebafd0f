"""params/register.yaml: the MLflow registry and the champion/challenger gate."""

import re
from typing import Literal

from pydantic import Field, field_validator

from components.config.loading import StrictModel

# Registered model names become part of `models:/NAME@alias` URIs: keep them URI-safe.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RegisterParams(StrictModel):
    model_name: str
    experiment: str
    primary_metric: Literal["l1", "psnr", "ssim", "fid", "kid"] = Field(
        description="the gate's metric; its direction (lower/higher is better) is fixed per metric"
    )
    margin: float = Field(ge=0.0, description="promote only if the challenger beats the champion by more than this")

    @field_validator("model_name", "experiment")
    @classmethod
    def _uri_safe(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, '_', '.', '-' (it becomes part of a models:/ URI)")
        return value
