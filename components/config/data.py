"""params/data.yaml: where the paired images come from, how `prepare` shards them, how the loaders read them."""

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from components.config.loading import ParamsError, StrictModel, location_keys
from components.redaction import has_userinfo

# Refused in params: credentials come from the AWS chain, and params end up in manifest.json and MLflow.
_NO_CREDENTIALS = ("holds a user name or password; remove it: credentials come from boto3's standard chain "
                   "(environment, ~/.aws, instance or pod role), never from params")

# The colour photographs bundled inside scikit-image (no download needed); the built-in
# source crops them. Listed here so a typo in params/data.yaml is a validation error.
BuiltinPhoto = Literal["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina"]

# JPEG chroma subsampling, in the notation Pillow and every image tool use.
Chroma = Literal["4:4:4", "4:2:2", "4:2:0"]


class S3Params(StrictModel):
    """Connection settings used when `source.path` is an `s3://bucket/prefix` address.

    Credentials are never params: boto3 takes them from its standard chain (environment,
    ~/.aws, instance or pod role).
    """

    endpoint_url: str | None  # for S3-compatible stores (MinIO, Ceph, R2); None = AWS
    region: str | None
    max_attempts: int = Field(ge=1, le=20)  # botocore "standard" retries on transient errors

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, endpoint_url: str | None) -> str | None:
        if endpoint_url is not None and has_userinfo(endpoint_url):
            raise ValueError(_NO_CREDENTIALS)
        return endpoint_url


class BuiltinSourceParams(StrictModel):
    """The default data set: seeded random crops of bundled photos (lightly smoothed) paired
    with their colour label maps (components/data/builtin.py)."""

    photos: list[BuiltinPhoto] = Field(min_length=1)
    train_pairs: int = Field(ge=1)
    val_pairs: int = Field(ge=0)
    test_pairs: int = Field(ge=0)
    # each crop's side is drawn in [min_crop_fraction, 1] x the photo's shorter side
    min_crop_fraction: float = Field(gt=0, le=1)
    # classes of the label map: the photos' pixels are clustered into this many reference colours
    label_classes: int = Field(ge=2, le=16)
    # Gaussian sigma, in pixels of the image_size image, applied to the target photo crop
    target_smoothing: float = Field(ge=0, le=8)
    seed: int


class JpegChromaParams(StrictModel):
    """The chroma subsampling each side of a pair is stored with.

    4:4:4 keeps full-resolution colour: label and edge maps keep their sharp colour edges.
    4:2:0 halves the colour resolution both ways, as most cameras and photo sets store it:
    smaller shards and faster decoding for photos, which keep almost everything (docs/data.md
    gives the PSNR of each setting on the facades set).
    """

    source: Chroma
    target: Chroma

    @field_validator("source", "target", mode="before")
    @classmethod
    def _quoted(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted 4:2:0 as the base-60 number 14520; say so rather than
        # list the accepted strings next to a number the user never wrote.
        if isinstance(value, int) and not isinstance(value, bool) and value >= 3600:
            hours, rest = divmod(value, 3600)
            written = f"{hours}:{rest // 60}:{rest % 60}"
            raise ValueError(f"YAML read the unquoted {written} as the number {value}: quote it, '{written}'")
        return value


class SourceParams(StrictModel):
    """Where the pairs come from.

    kind: builtin (no path), pix2pix (each image holds both halves side by side, in
    train/ val/ test/), paired_folders (A/<split>/ and B/<split>/ matched by file name).
    path: a local folder (relative to the directory the stage runs in) or s3://bucket/prefix.
    direction: AtoB makes A (the left half, or folder A/) the source; BtoA the reverse.
    """

    kind: Literal["builtin", "pix2pix", "paired_folders"]
    path: str | None
    direction: Literal["AtoB", "BtoA"]
    s3: S3Params
    builtin: BuiltinSourceParams

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
            if has_userinfo(path):
                raise ValueError(_NO_CREDENTIALS)
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
    """How the training and evaluation loaders read the shards (prepared at `image_size`).

    Training: resize to `load_size_for(image_size)` (image_size x load_scale), one random
    image_size crop and one coin flip per pair, the same for source and target.
    Evaluation: the image_size images as prepared, no crop, no flip.
    """

    # auto: DALI when it can be imported, else nvJPEG (torchvision) on a GPU, else torch (Pillow)
    backend: Literal["auto", "dali", "torch", "nvjpeg"]
    # pix2pix's load_size as a ratio, so that it follows image_size (pix2pix: 286 / 256 = 1.117)
    load_scale: float = Field(ge=1.0, le=2.0)
    flip: bool
    num_threads: int = Field(ge=1, le=256)
    shuffle_buffer: int = Field(ge=1)  # samples held for shuffling (per rank)
    prefetch: int = Field(ge=1, le=32)  # batches decoded ahead
    # Node-local cache of verified shards (S3 shards are downloaded into it). null: the
    # user's cache folder on each node (~/.cache/pairgan/shards). Resolved on the node that
    # reads, so it must be absolute or start with ~.
    cache_dir: str | None
    cache_max_gib: float = Field(gt=0)  # least recently used shards are evicted beyond this

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_absolute(cls, cache_dir: str | None) -> str | None:
        if cache_dir is not None and not (cache_dir.startswith("~") or Path(cache_dir).is_absolute()):
            raise ValueError(f"{cache_dir!r} is relative: use an absolute path or ~/... (each node resolves it)")
        return cache_dir

    def load_size_for(self, image_size: int) -> int:
        """The side training resizes an image_size image to before its random image_size crop."""
        return round(image_size * self.load_scale)


# Validation context for stages that read data.yaml without preparing (train, evaluate,
# register): they read the prepared shards, so the source folder need not exist where they
# run (a training node, a CI job that restored data/prepared).
READS_SHARDS_ONLY = {"check_source_path": False}


class DataParams(StrictModel):
    """The whole of params/data.yaml."""

    source: SourceParams
    # The one image size: prepare stores each half at image_size x image_size, the networks
    # are built for it, evaluation and predict translate at it. A power of two (the U-Nets
    # halve it per level), checked here so that prepare refuses a size train cannot use.
    image_size: int = Field(ge=16, le=4096)
    jpeg_quality: int = Field(ge=1, le=100)
    jpeg_chroma: JpegChromaParams
    shard_max_count: int = Field(ge=1)  # pairs per tar shard
    # Share of train carved off as val when the source has no val split; a pair's split is
    # decided by a seeded hash of its key, so appending new pairs never moves old ones.
    val_fraction: float = Field(ge=0, lt=1)
    seed: int
    mode: Literal["overwrite", "append"]
    on_bad_input: Literal["stop", "skip"]
    # Inputs refused as bad: a half whose shorter side would be enlarged more than max_upscale
    # times to reach image_size, or whose aspect ratio (longer / shorter side) exceeds
    # max_aspect_ratio (resizing to a square would stretch it).
    max_upscale: float = Field(ge=1)
    max_aspect_ratio: float = Field(ge=1)
    loader: LoaderParams

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, image_size: int) -> int:
        if image_size & (image_size - 1):
            raise ValueError(
                f"{image_size} is not a power of two (the U-Nets halve it per level): use 32, 64, 128, 256..."
            )
        return image_size

    @classmethod
    def unknown_key_reason(cls, location: tuple) -> str:
        # The two sizes the loader had before image_size was the only one: say what replaced them.
        replaced = {
            ("loader", "crop_size"): "no longer a key: the crop is image_size, the one image size",
            ("loader", "load_size"): "no longer a key: set loader.load_scale (load size = image_size x load_scale)",
        }
        return replaced.get(location_keys(location)) or super().unknown_key_reason(location)

    @property
    def load_size(self) -> int:
        """The training loader's resize before the random crop (image_size x loader.load_scale)."""
        return self.loader.load_size_for(self.image_size)


def check_prepared_size(params: DataParams, prepared_size: int, params_path: Path | str, prepared: str) -> None:
    """Refuse prepared data whose size is not params' image_size (data.yaml changed, prepare not rerun)."""
    if prepared_size != params.image_size:
        raise ParamsError(params_path, [(
            "image_size",
            f"is {params.image_size}, but {prepared} was prepared at {prepared_size} px: run `pairgan prepare` "
            f"(dvc repro does) to prepare it at {params.image_size}, or set image_size back to {prepared_size}",
        )])


def check_trained_size(trained_size: int, model: str, params: DataParams, params_path: Path | str) -> None:
    """Refuse to use a generator trained at another size than params' image_size (it translates that size only)."""
    if trained_size != params.image_size:
        raise ParamsError(params_path, [(
            "image_size",
            f"is {params.image_size}, but {model} was trained at {trained_size} px and translates only that size: "
            f"train it again at {params.image_size} (dvc repro does), or set image_size back to {trained_size}",
        )])
