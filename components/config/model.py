"""params/model.yaml: the networks and the training method.

`method` is a discriminated union on `method.name`; each branch holds only the keys its
method uses, so a key given to the wrong method is an error, never silently ignored.
"""

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from components.config.loading import StrictModel

Norm = Literal["instance", "batch", "none"]
PositiveInt = Annotated[int, Field(gt=0)]


class UNetParams(StrictModel):
    """pix2pix U-Net generator; its depth follows the image size (one halving per level down to 1x1)."""

    ngf: PositiveInt = 64
    max_multiplier: PositiveInt = 8
    norm: Norm = "batch"
    dropout: float = Field(0.5, ge=0.0, lt=1.0)


class PatchGANParams(StrictModel):
    """PatchGAN discriminator: `n_layers` stride-2 convolutions, then two stride-1 ones."""

    ndf: PositiveInt = 64
    n_layers: Annotated[int, Field(ge=1, le=6)] = 3
    norm: Norm = "batch"


class DDPMUNetParams(StrictModel):
    """DDPM-style U-Net (ATME's and DDGAN's generator)."""

    width: PositiveInt = 64
    channel_multipliers: tuple[PositiveInt, ...] = (1, 2, 4, 8)
    attention_levels: tuple[int, ...] = (0, 1, 2, 3)
    blocks_per_level: Annotated[int, Field(ge=1, le=4)] = 2
    groups: PositiveInt = 8
    attention_heads: PositiveInt = 4
    attention_head_dim: PositiveInt = 32
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

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

    gan_loss: Literal["vanilla", "lsgan", "hinge"] = "vanilla"
    # One-sided label smoothing: the real label becomes 1 - label_smoothing (fakes stay 0).
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    lambda_l1: float = Field(100.0, ge=0.0)
    # R1 penalty gamma/2 * |grad_real D|^2, run lazily as the D-reg phase every r1_interval steps.
    r1_gamma: float = Field(0.0, ge=0.0)
    r1_interval: PositiveInt = 16


class DiffusionGANParams(StrictModel):
    """Diffusion-GAN (Wang et al. 2023): diffuse D's target-side inputs with an adaptive T."""

    t_min: PositiveInt = 5
    t_max: PositiveInt = 500
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0)
    beta_end: float = Field(2e-2, gt=0.0, lt=1.0)
    sigma: float = Field(0.05, gt=0.0)
    t_distribution: Literal["priority", "uniform"] = "priority"
    update_interval: PositiveInt = 4
    ada_kimg: float = Field(100.0, gt=0.0)
    d_target: float = Field(0.6, gt=-1.0, lt=1.0)

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
    generator: UNetParams = UNetParams()
    discriminator: PatchGANParams = PatchGANParams()
    loss: LossParams = LossParams()
    diffusion_gan: DiffusionGANParams | None = None


class ATMEWParams(StrictModel):
    """ATME's W: three (upsample, conv, GroupNorm, SiLU) blocks from the D map to the image size."""

    channels: tuple[PositiveInt, PositiveInt, PositiveInt] = (32, 64, 32)
    groups: PositiveInt = 8

    @model_validator(mode="after")
    def _divisible(self) -> "ATMEWParams":
        bad = [c for c in self.channels if c % self.groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by groups = {self.groups}")
        return self


class ATMEParams(OneStepMethodParams):
    name: Literal["atme"]
    generator: DDPMUNetParams = DDPMUNetParams()
    discriminator: PatchGANParams = PatchGANParams()
    w: ATMEWParams = ATMEWParams()
    loss: LossParams = LossParams()
    # The constant D map fed to W at test time. Logit 0 is D = 1/2, the maximum-entropy
    # state training drives D towards (the reference used 0.5 + 0.001 N(0, 1), i.e. D = 0.62).
    test_map_logit: float = 0.0
    diffusion_gan: DiffusionGANParams | None = None


class GuidanceParams(StrictModel):
    """Classifier-free guidance: drop the source with p_uncond in training, weight w at sampling."""

    p_uncond: float = Field(0.1, gt=0.0, lt=1.0)
    weight: float = Field(0.0, ge=0.0)


class DDGANParams(StrictModel):
    name: Literal["ddgan"]
    generator: DDPMUNetParams = DDPMUNetParams()
    discriminator: PatchGANParams = PatchGANParams(norm="none")
    loss: LossParams = LossParams(lambda_l1=0.0, r1_gamma=0.05, r1_interval=15)
    num_steps: int = 4
    beta_min: float = Field(0.1, gt=0.0)
    beta_max: float = Field(20.0, gt=0.0)
    nz: PositiveInt = 100
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    guidance: GuidanceParams | None = None

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


METHOD_NAMES = ("pix2pix", "atme", "ddgan")


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


class ModelParams(StrictModel):
    """All of params/model.yaml."""

    # Must equal the data's crop size and load size (the train stage checks them against
    # params/data.yaml); the load size bounds where ATME's memory places a crop.
    image_size: Annotated[int, Field(ge=16)] = 64
    load_size: Annotated[int, Field(ge=16)] | None = None
    source_channels: PositiveInt = 3
    target_channels: PositiveInt = 3
    method: MethodParams = Pix2PixParams(name="pix2pix")

    @model_validator(mode="after")
    def _sizes(self) -> "ModelParams":
        if self.image_size & (self.image_size - 1):
            raise ValueError(f"image_size = {self.image_size} must be a power of two (the U-Nets halve it per level)")
        if self.load_size is not None and self.load_size < self.image_size:
            raise ValueError(f"load_size = {self.load_size} is smaller than image_size = {self.image_size}")
        method = self.method
        if isinstance(method, ATMEParams | DDGANParams):
            levels = len(method.generator.channel_multipliers)
            if self.image_size >> (levels - 1) < 2:
                raise ValueError(
                    f"method.generator.channel_multipliers has {levels} levels, too many for image_size "
                    f"{self.image_size} (each level but the last halves the resolution)"
                )
        if self.image_size >> method.discriminator.n_layers < 4:
            raise ValueError(
                f"method.discriminator.n_layers = {method.discriminator.n_layers} is too deep for "
                f"image_size {self.image_size}: its logit map would vanish"
            )
        return self

    @property
    def crop_margin(self) -> int:
        """Pixels a random crop can move the image (0 without random crops)."""
        return 0 if self.load_size is None else self.load_size - self.image_size
