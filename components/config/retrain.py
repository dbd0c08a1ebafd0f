"""params/retrain.yaml: `pairgan retrain`, the command a scheduler runs."""

from typing import Literal

from pydantic import Field, field_validator

from components.config.loading import StrictModel


class RetrainParams(StrictModel):
    start_from: Literal["scratch", "champion"] = Field(
        description="scratch: the new model's networks start from random weights; champion: from the weights "
        "the current @champion was trained to"
    )
    remote: str | None = Field(description="the DVC remote holding the state; null: .dvc/config's default remote")
    lock_ttl_s: int = Field(
        ge=60, description="S3 state only: how long the lock of a retrain that died blocks the next one (seconds)"
    )

    @field_validator("remote")
    @classmethod
    def _a_name(cls, value: str | None) -> str | None:
        if value is not None and ("://" in value or "/" in value):
            raise ValueError("the name of a DVC remote (`dvc remote list`), not a URL: set its URL in .dvc/config")
        return value
