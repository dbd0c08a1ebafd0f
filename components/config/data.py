"""params/data.yaml: where the paired images come from, how `prepare` shards them, how the loaders read them."""

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from components.config.loading import StrictModel

# The colour photographs bundled inside scikit-image (no download needed); the built-in
# source crops them. Listed here so a typo in params/data.yaml is a validation error.
BuiltinPhoto = Literal["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina"]


class S3Params(StrictModel):
    """Connection settings used when `source.path` is an `s3://bucket/prefix` address.

    Credentials are never params: boto3 takes them from its standard chain (environment,
    ~/.aws, instance or pod role).
    """

    endpoint_url: str | None = None  # for S3-compatible stores (MinIO, Ceph, R2); None = AWS
    region: str | None = None
    max_attempts: int = Field(default=5, ge=1, le=20)  # botocore "standard" retries on transient errors


class BuiltinSourceParams(StrictModel):
    """The default data set: seeded random crops of bundled photos (lightly smoothed) paired
    with their colour label maps (components/data/builtin.py)."""

    photos: list[BuiltinPhoto] = Field(
        default=["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina"], min_length=1
    )
    train_pairs: int = Field(default=512, ge=1)
    val_pairs: int = Field(default=16, ge=0)
    test_pairs: int = Field(default=64, ge=0)
    # each crop's side is drawn in [min_crop_fraction, 1] x the photo's shorter side
    min_crop_fraction: float = Field(default=0.3, gt=0, le=1)
    # classes of the label map: the photos' pixels are clustered into this many reference colours
    label_classes: int = Field(default=12, ge=2, le=16)
    # Gaussian sigma, in pixels of the image_size image, applied to the target photo crop
    target_smoothing: float = Field(default=1.0, ge=0, le=8)
    seed: int = 0


class SourceParams(StrictModel):
    """Where the pairs come from.

    kind: builtin (no path), pix2pix (each image holds both halves side by side, in
    train/ val/ test/), paired_folders (A/<split>/ and B/<split>/ matched by file name).
    path: a local folder (relative to the directory the stage runs in) or s3://bucket/prefix.
    direction: AtoB makes A (the left half, or folder A/) the source; BtoA the reverse.
    """

    kind: Literal["builtin", "pix2pix", "paired_folders"] = "builtin"
    path: str | None = None
    direction: Literal["AtoB", "BtoA"] = "AtoB"
    s3: S3Params = S3Params()
    builtin: BuiltinSourceParams = BuiltinSourceParams()

    @field_validator("path")
    @classmethod
    def _path_matches_kind(cls, path: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind == "builtin":
            if path is not None:
                raise ValueError("must be null when source.kind is builtin (the built-in data has no path)")
            return path
        if not path:
            raise ValueError(f"is required when source.kind is {kind}: a local folder or s3://bucket/prefix")
        if path.startswith("s3://"):
            if not path.removeprefix("s3://").split("/", 1)[0]:
                raise ValueError(f"{path!r} names no bucket (expected s3://bucket/prefix)")
            return path
        context = info.context or {}
        # Stages that only read the shards (train, evaluate) or write the source themselves
        # (builtin-data) pass check_source_path=False: the folder need not exist where they run.
        if not context.get("check_source_path", True):
            return path
        base_dir = Path(context.get("base_dir", "."))
        local = base_dir / path
        if not local.is_dir():
            raise ValueError(f"{path!r} is not an existing folder (looked at {local.resolve()})")
        return path


class LoaderParams(StrictModel):
    """How the training and evaluation loaders read the shards.

    Training: resize to load_size, one random crop_size crop and one coin flip per pair, the
    same for source and target. Evaluation: resize to crop_size, no crop, no flip.
    """

    backend: Literal["auto", "dali", "torch"] = "auto"  # auto: DALI when it can be imported
    load_size: int = Field(default=72, ge=8, le=4096)
    crop_size: int = Field(default=64, ge=8, le=4096)
    flip: bool = True
    num_threads: int = Field(default=2, ge=1, le=256)
    shuffle_buffer: int = Field(default=512, ge=1)  # samples held for shuffling (per rank)
    prefetch: int = Field(default=2, ge=1, le=32)  # batches decoded ahead

    @field_validator("crop_size")
    @classmethod
    def _crop_fits(cls, crop_size: int, info: ValidationInfo) -> int:
        load_size = info.data.get("load_size")
        if load_size is not None and crop_size > load_size:
            raise ValueError(f"{crop_size} is larger than loader.load_size ({load_size}); a crop must fit the resized image")
        return crop_size


# Validation context for stages that read data.yaml only for its `loader` section (train,
# evaluate, register): they read the prepared shards, so the source folder need not exist
# where they run (a training node, a CI job that restored data/prepared).
READS_SHARDS_ONLY = {"check_source_path": False}


class DataParams(StrictModel):
    """The whole of params/data.yaml."""

    source: SourceParams = SourceParams()
    image_size: int = Field(default=64, ge=8, le=4096)  # each half is resized to image_size x image_size once
    jpeg_quality: int = Field(default=95, ge=1, le=100)
    shard_max_count: int = Field(default=256, ge=1)  # pairs per tar shard
    # Share of train carved off as val when the source has no val split; a pair's split is
    # decided by a seeded hash of its key, so appending new pairs never moves old ones.
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0
    mode: Literal["overwrite", "append"] = "overwrite"
    on_bad_input: Literal["stop", "skip"] = "stop"
    loader: LoaderParams = LoaderParams()
