"""params/train.yaml: the training loop, optimisers, LR schedule, health checks, performance switches.

The `run:` section (Ray scaling, checkpoints, MLflow tracking) is `RunParams` from
components/config/run.py.
"""

from typing import Annotated, Literal

from pydantic import Field, Strict, field_validator, model_validator

from components.config.loading import StrictModel
from components.config.run import RunParams

PositiveInt = Annotated[int, Field(gt=0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class OptimizerParams(StrictModel):
    """Adam for G (with ATME's W) and for D."""

    lr_g: float = Field(gt=0.0)
    lr_d: float = Field(gt=0.0)
    # null: the method's published betas, (0.5, 0.999) for pix2pix and ATME, (0.5, 0.9) for DDGAN.
    betas: Annotated[tuple[Beta, Beta], Strict(False)] | None


class LRScheduleParams(StrictModel):
    """Learning-rate factor per epoch, the same for G and D.

    linear_decay: constant, then linear decay to 0 over the last `decay_epochs` (pix2pix).
    cosine: cosine from the base LR to `lr_floor` over all epochs (DDGAN).
    constant: no schedule.
    auto: cosine for DDGAN, linear_decay otherwise.
    """

    kind: Literal["auto", "linear_decay", "cosine", "constant"]
    # null: half of `epochs` (pix2pix trains 100 constant + 100 decaying epochs).
    decay_epochs: Annotated[int, Field(ge=0)] | None
    lr_floor: float = Field(ge=0.0)


class HealthParams(StrictModel):
    """The divergence detector; its checks run every `check_interval` steps (one host sync each)."""

    check_interval: PositiveInt
    # A loss that is NaN or infinite stops the run at the next check.
    stop_on_nonfinite: bool
    # D's loss below this floor for `patience_steps` consecutive steps: D has won, G gets no signal.
    d_loss_floor: float = Field(ge=0.0)
    # D classifying every real and fake patch correctly for `patience_steps` consecutive steps.
    stop_on_perfect_d: bool
    patience_steps: PositiveInt


class ValidationParams(StrictModel):
    """A fixed subset of the val split scored every few epochs (L1, PSNR, SSIM as `val/...` metrics).

    The subset is the split's first `samples` samples in index order, the same every epoch and
    every run, scored by worker rank 0 with the sampler the exported generator uses.
    """

    samples: int = Field(ge=0)  # 0: no validation
    every_epochs: PositiveInt  # and always after the last epoch
    # DDGAN trained with guidance: after the last epoch, the subset is scored at each weight w.
    guidance_weights: list[Annotated[float, Field(ge=0.0)]]

    @field_validator("guidance_weights")
    @classmethod
    def _distinct(cls, weights: list[float]) -> list[float]:
        if len(set(weights)) != len(weights):
            raise ValueError("guidance weights must not repeat")
        return weights


class PerformanceParams(StrictModel):
    """Speed and memory switches (components/training/performance.py applies them).

    The on/off switches take true, false or auto (YAML reads a bare on/off as true/false too);
    auto is what the GPU measurements in docs/benchmarks.md found to win on CUDA, and off on the CPU.
    """

    autocast: Literal["auto", "none", "bf16"]
    channels_last: bool | Literal["auto"]
    fused_adam: bool | Literal["auto"]
    tf32: bool
    # cuDNN times its convolution algorithms on the first step of each shape and keeps the fastest.
    cudnn_benchmark: bool | Literal["auto"]
    # Regional torch.compile of the networks' repeated blocks; a block that fails to compile
    # runs eagerly with a warning.
    compile: bool | Literal["auto"]
    # With compile: keep the compiled code under run.storage_path/compile-cache/ for the next run
    # (components/training/compile_cache.py). It is code the workers run: storage only training writes.
    compile_cache: bool
    # The compiled blocks as CUDA graphs (CUDA only; needs compile).
    cuda_graphs: bool | Literal["auto"]
    # The DDPM U-Net's full attention through F.scaled_dot_product_attention.
    sdpa: bool | Literal["auto"]
    # Recompute the repeated blocks in the backward pass instead of storing their activations.
    activation_checkpointing: bool | Literal["auto"]
    # The DDPM U-Net's group norm, FiLM and SiLU as one operation (Triton kernels on CUDA);
    # for eager mode: off under compile, which fuses them itself.
    fused_norm: bool | Literal["auto"]

    @model_validator(mode="after")
    def _graphs_need_compile(self) -> "PerformanceParams":
        if self.cuda_graphs is True and self.compile is False:
            raise ValueError(
                "cuda_graphs: true needs compile (the CUDA graphs capture the compiled blocks); "
                "set compile to true or auto, or cuda_graphs to false"
            )
        return self


class TrainParams(StrictModel):
    """All of params/train.yaml."""

    epochs: PositiveInt
    batch_size: PositiveInt
    seed: int
    optimizer: OptimizerParams
    lr_schedule: LRScheduleParams
    health: HealthParams
    performance: PerformanceParams
    validation: ValidationParams
    run: RunParams

    @model_validator(mode="after")
    def _decay_fits(self) -> "TrainParams":
        decay = self.lr_schedule.decay_epochs
        if decay is not None and decay > self.epochs:
            raise ValueError(f"lr_schedule.decay_epochs = {decay} exceeds epochs = {self.epochs}")
        lowest = min(self.optimizer.lr_g, self.optimizer.lr_d)
        if self.lr_schedule.kind == "cosine" and self.lr_schedule.lr_floor > lowest:
            # The cosine would climb from the base LR up to the "floor" instead of decaying.
            raise ValueError(
                f"lr_schedule.lr_floor = {self.lr_schedule.lr_floor} exceeds the learning rate {lowest} "
                "(optimizer.lr_g / lr_d) that the cosine decays from"
            )
        return self
