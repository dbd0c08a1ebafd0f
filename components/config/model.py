"""params/model.yaml: the networks and the training method.

`method` is a discriminated union on `method.name`; each branch holds only the keys its
method uses, so a key given to the wrong method is an error naming the method it belongs
to, never silently ignored. Complete blocks for every method, small and at the published
sizes, are the presets in params/examples/.

The image size is not a model.yaml key: it is set once, in params/data.yaml, and
`load_model_params` gives the model the data's `image_size` and training `load_size`.
An exported generator keeps the sizes it was trained at in its model params.
"""

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Strict, Tag, field_validator, model_validator

from components.config.data import DataParams
from components.config.loading import (
    ParamsError,
    StrictModel,
    location_keys,
    read_yaml_mapping,
    section_model,
    validate_params,
)

Norm = Literal["instance", "batch", "none"]
PositiveInt = Annotated[int, Field(gt=0)]


class UNetParams(StrictModel):
    """pix2pix U-Net generator; its depth follows the image size (one halving per level down to 1x1)."""

    ngf: PositiveInt
    max_multiplier: PositiveInt
    norm: Norm
    dropout: float = Field(ge=0.0, lt=1.0)


class PatchGANParams(StrictModel):
    """PatchGAN discriminator: `n_layers` stride-2 convolutions, then two stride-1 ones."""

    ndf: PositiveInt
    n_layers: Annotated[int, Field(ge=1, le=6)]
    norm: Norm


class DDPMUNetParams(StrictModel):
    """DDPM-style U-Net (ATME's and DDGAN's generator)."""

    width: PositiveInt
    channel_multipliers: Annotated[tuple[PositiveInt, ...], Strict(False)]
    attention_levels: Annotated[tuple[int, ...], Strict(False)]
    blocks_per_level: Annotated[int, Field(ge=1, le=4)]
    groups: PositiveInt
    attention_heads: PositiveInt
    attention_head_dim: PositiveInt
    dropout: float = Field(ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> "DDPMUNetParams":
        if not self.channel_multipliers:
            raise ValueError("channel_multipliers must name at least one level")
        levels = len(self.channel_multipliers)
        bad = [level for level in self.attention_levels if not 0 <= level < levels]
        if bad:
            raise ValueError(f"attention_levels {bad} outside the {levels} levels 0..{levels - 1}")
        for multiplier in self.channel_multipliers:
            if (self.width * multiplier) % self.groups:
                raise ValueError(
                    f"width * multiplier = {self.width * multiplier} is not divisible by groups = {self.groups}"
                )
        return self


class LossParams(StrictModel):
    """GAN objective options shared by every method."""

    gan_loss: Literal["vanilla", "lsgan", "hinge"]
    # One-sided label smoothing: the real label becomes 1 - label_smoothing (fakes stay 0).
    label_smoothing: float = Field(ge=0.0, lt=0.5)
    lambda_l1: float = Field(ge=0.0)
    # R1 penalty gamma/2 * |grad_real D|^2, run lazily as the D-reg phase every r1_interval steps.
    r1_gamma: float = Field(ge=0.0)
    r1_interval: PositiveInt


class DiffusionGANParams(StrictModel):
    """Diffusion-GAN (Wang et al. 2023): diffuse D's target-side inputs with an adaptive T."""

    t_min: PositiveInt
    t_max: PositiveInt
    beta_start: float = Field(gt=0.0, lt=1.0)
    beta_end: float = Field(gt=0.0, lt=1.0)
    sigma: float = Field(gt=0.0)
    t_distribution: Literal["priority", "uniform"]
    update_interval: PositiveInt
    ada_kimg: float = Field(gt=0.0)
    d_target: float = Field(gt=-1.0, lt=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> "DiffusionGANParams":
        if self.t_min > self.t_max:
            raise ValueError(f"t_min = {self.t_min} must not exceed t_max = {self.t_max}")
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start = {self.beta_start} must be below beta_end = {self.beta_end}")
        return self


_ONE_STEP_GUIDANCE = (
    "guidance is not a {name} key: classifier-free guidance needs a multi-step sampler that predicts the clean image from a "
    "noisy one; this method maps the source to the image in one call, so there is nothing to "
    "guide (use method.name: ddgan with guidance:)"
)


class OneStepMethodParams(StrictModel):
    """Methods whose generator maps the source to the image in one call (pix2pix, ATME)."""

    @model_validator(mode="before")
    @classmethod
    def _no_guidance(cls, data: Any) -> Any:
        if isinstance(data, dict) and "guidance" in data:
            raise ValueError(_ONE_STEP_GUIDANCE.format(name=data.get("name")))
        return data


class Pix2PixParams(OneStepMethodParams):
    name: Literal["pix2pix"]
    generator: UNetParams
    discriminator: PatchGANParams
    loss: LossParams
    diffusion_gan: DiffusionGANParams | None


class ATMEWParams(StrictModel):
    """ATME's W: three (upsample, conv, GroupNorm, SiLU) blocks from the D map to the image size."""

    channels: Annotated[tuple[PositiveInt, PositiveInt, PositiveInt], Strict(False)]
    groups: PositiveInt

    @model_validator(mode="after")
    def _divisible(self) -> "ATMEWParams":
        bad = [c for c in self.channels if c % self.groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by groups = {self.groups}")
        return self


class ATMEParams(OneStepMethodParams):
    name: Literal["atme"]
    generator: DDPMUNetParams
    discriminator: PatchGANParams
    w: ATMEWParams
    loss: LossParams
    # The constant D map fed to W at test time. Logit 0 is D = 1/2, the maximum-entropy
    # state training drives D towards (the reference used 0.5 + 0.001 N(0, 1), i.e. D = 0.62).
    test_map_logit: float
    diffusion_gan: DiffusionGANParams | None


class GuidanceParams(StrictModel):
    """Classifier-free guidance: drop the source with p_uncond in training, weight w at sampling."""

    p_uncond: float = Field(gt=0.0, lt=1.0)
    weight: float = Field(ge=0.0)


class DDGANParams(StrictModel):
    name: Literal["ddgan"]
    generator: DDPMUNetParams
    discriminator: PatchGANParams
    loss: LossParams
    num_steps: int
    beta_min: float = Field(gt=0.0)
    beta_max: float = Field(gt=0.0)
    nz: PositiveInt
    ema_decay: float = Field(ge=0.0, lt=1.0)
    guidance: GuidanceParams | None

    @field_validator("num_steps")
    @classmethod
    def _few_steps(cls, value: int) -> int:
        if not 2 <= value <= 8:
            raise ValueError(
                f"num_steps = {value}: DDGAN denoises in 2 to 8 large steps (the paper uses 2 or 4; "
                "1 is a plain GAN, use pix2pix)"
            )
        return value

    @model_validator(mode="after")
    def _beta_order(self) -> "DDGANParams":
        if self.beta_min >= self.beta_max:
            raise ValueError(f"beta_min = {self.beta_min} must be below beta_max = {self.beta_max}")
        return self


METHODS: dict[str, type[StrictModel]] = {"pix2pix": Pix2PixParams, "atme": ATMEParams, "ddgan": DDGANParams}
METHOD_NAMES = tuple(METHODS)

# What a section of a method block is, in the words of docs/methods.md.
_SECTION_NAMES: dict[type, str] = {
    UNetParams: "U-Net",
    DDPMUNetParams: "DDPM U-Net",
    PatchGANParams: "PatchGAN",
    ATMEWParams: "W network",
    LossParams: "loss",
    DiffusionGANParams: "Diffusion-GAN",
    GuidanceParams: "classifier-free guidance",
}


def _method_tag(data: Any) -> str | None:
    # Tags in brackets: the params loader leaves bracketed union tags out of the dotted key
    # it reports, so an error reads `method.loss.gan_loss`, not `method.pix2pix.loss...`.
    name = data.get("name") if isinstance(data, dict) else getattr(data, "name", None)
    return f"[{name}]" if name in METHOD_NAMES else None


MethodParams = Annotated[
    Annotated[Pix2PixParams, Tag("[pix2pix]")] | Annotated[ATMEParams, Tag("[atme]")] | Annotated[DDGANParams, Tag("[ddgan]")],
    Discriminator(
        _method_tag,
        custom_error_type="unknown_method",
        custom_error_message=f"method.name must be one of {', '.join(METHOD_NAMES)}",
    ),
]


def _chosen_method(location: tuple) -> tuple[str, tuple] | None:
    """(method name, the key path inside its block) for an error location under `method`."""
    if len(location) < 2 or location[0] != "method" or not str(location[1]).startswith("["):
        return None
    return str(location[1])[1:-1], location_keys(location[2:])


def _section_words(method: str, section: type | None, path: tuple) -> str:
    """"atme" for the block itself, "atme's generator (DDPM U-Net)" for a section of it."""
    if not path:
        return method
    name = _SECTION_NAMES.get(section)
    return f"{method}'s {path[-1]}" + (f" ({name})" if name and name != path[-1] else "")


class ModelParams(StrictModel):
    """All of params/model.yaml, with the sizes of the data params (see `load_model_params`)."""

    # The data's image_size (prepared size, crop size, the networks' size) and the size the
    # training loader resizes to before its random crop, which bounds where ATME's memory
    # places a crop. Never keys of model.yaml.
    image_size: Annotated[int, Field(ge=16)]
    load_size: Annotated[int, Field(ge=16)]
    source_channels: PositiveInt
    target_channels: PositiveInt
    method: MethodParams

    @model_validator(mode="after")
    def _sizes(self) -> "ModelParams":
        if self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size = {self.image_size} must be a power of two (the U-Nets halve it per level)")
        if self.load_size < self.image_size:
            raise ValueError(f"load_size = {self.load_size} is smaller than image_size = {self.image_size}")
        method = self.method
        if isinstance(method, ATMEParams | DDGANParams):
            levels = len(method.generator.channel_multipliers)
            if self.image_size >> (levels - 1) < 2:
                raise ValueError(
                    f"method.generator.channel_multipliers has {levels} levels, too many for image_size "
                    f"{self.image_size} of the data params (each level but the last halves the resolution)"
                )
        if self.image_size >> method.discriminator.n_layers < 4:
            raise ValueError(
                f"method.discriminator.n_layers = {method.discriminator.n_layers} is too deep for "
                f"image_size {self.image_size} of the data params: its logit map would vanish"
            )
        return self

    @property
    def crop_margin(self) -> int:
        """Pixels a random crop can move the image (0 without random crops)."""
        return self.load_size - self.image_size

    @classmethod
    def unknown_key_reason(cls, location: tuple) -> str:
        # A key of another method (switching `name` and keeping the old block): say whose it
        # is and what the chosen method takes instead.
        chosen = _chosen_method(location)
        if chosen is None or chosen[0] not in METHODS or not chosen[1]:
            return super().unknown_key_reason(location)
        name, path = chosen
        owners = [
            _section_words(other, section_model(branch, path[:-1]), path[:-1])
            for other, branch in METHODS.items()
            if other != name and section_model(branch, path[:-1]) is not None
            and path[-1] in section_model(branch, path[:-1]).model_fields
        ]
        section = section_model(METHODS[name], path[:-1])
        if not owners or section is None:
            return super().unknown_key_reason(location)
        return (
            f"belongs to {' and '.join(owners)}; {_section_words(name, section, path[:-1])} accepts "
            f"{', '.join(section.model_fields)}"
        )

    @classmethod
    def missing_key_reason(cls, location: tuple) -> str:
        chosen = _chosen_method(location)
        if chosen is None or chosen[0] not in METHODS:
            return super().missing_key_reason(location)
        return (
            f"the {chosen[0]} block needs every one of its keys: params/examples/ has complete {chosen[0]} "
            "blocks, small and at the published sizes, to copy from"
        )


# model.yaml keys that are not model.yaml's: where each is set instead.
SIZE_KEYS = {"image_size": "image_size", "load_size": "loader.load_scale (load_size = image_size x load_scale)"}


def validate_model_params(model_file: dict, data: DataParams, path: Path | str, data_path: Path | str) -> ModelParams:
    """The model params of model.yaml's content, with the image and load sizes of the data params."""
    misplaced = [
        (key, f"the image size is set once, in {data_path}: {where}; remove this key")
        for key, where in SIZE_KEYS.items()
        if key in model_file
    ]
    if misplaced:
        raise ParamsError(path, misplaced)
    sized = {**model_file, "image_size": data.image_size, "load_size": data.load_size}
    return validate_params(sized, ModelParams, path)


def load_model_params(path: Path | str, data: DataParams, data_path: Path | str) -> ModelParams:
    """Load params/model.yaml (`path`) for the data of params/data.yaml (`data`, read from `data_path`)."""
    return validate_model_params(read_yaml_mapping(path), data, path, data_path)

