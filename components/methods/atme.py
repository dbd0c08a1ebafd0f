"""ATME (Solano-Carrillo et al., CVPRW 2023): G sees the source corrupted by W(D's last map for this sample).

Per step: read this sample's stored D logit map, W maps it to (-1, 1) at image size, the
source is corrupted as x_t = x * (1 + W_t) and G(x_t, mean W_t) makes the fake; after the
step D's logits on that fake are written back for the sample. Everything else (D, losses,
optional Diffusion-GAN) is pix2pix's.

The memory is kept in the un-augmented frame: maps are stored un-flipped, on a canvas that
covers the whole load_size image, at the crop's position (rounded to D's patch stride), so a
sample read under another crop or flip gets the map of the same image region.
Batch["crop"] is the corner in the resized image before the flip (the pix2pix order).
"""

from collections.abc import Callable

import torch
from torch import nn

from components.config.model import ATMEParams, ModelParams
from components.data.batch import Batch
from components.methods.base import Autocast, Prepare, Reduce, unwrap
from components.methods.pix2pix import Pix2Pix
from components.networks.atme_w import ATMEW
from components.networks.ddpm_unet import DDPMUNet
from components.networks.pix2pix import patch_map_size
from components.training.stats import StatsCollector


def build_ddpm_generator(model: ModelParams, in_channels: int, out_channels: int, latent_dim: int | None = None) -> DDPMUNet:
    params = model.method.generator
    return DDPMUNet(
        in_channels,
        out_channels,
        params.width,
        params.channel_multipliers,
        params.attention_levels,
        params.blocks_per_level,
        params.groups,
        params.attention_heads,
        params.attention_head_dim,
        params.dropout,
        latent_dim,
    )


def build_w(model: ModelParams) -> ATMEW:
    return ATMEW(model.image_size, model.method.w.channels, model.method.w.groups)


class ATMEMemory:
    """D's logit map per dataset sample, in the un-augmented frame, with an `owned` mask.

    `owned[i]` is True once this process wrote sample i. Under data parallelism each rank
    sees a fixed subset of samples, so each rank owns those entries; `merge_memories` combines
    the ranks' memories for a checkpoint.
    """

    def __init__(self, dataset_size: int, map_size: int, patch_stride: int, crop_margin: int, device: torch.device):
        self.map_size = map_size
        self.patch_stride = patch_stride
        self.margin_cells = -(-crop_margin // patch_stride)
        canvas = map_size + self.margin_cells
        # U[0, 1) as the reference initialises it.
        self.maps = torch.rand(dataset_size, canvas, canvas, device=device)
        self.owned = torch.zeros(dataset_size, dtype=torch.bool, device=device)
        self._offsets = torch.arange(map_size, device=device)

    def _cells(self, crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        corner = torch.round(crop.float() / self.patch_stride).long().clamp(0, self.margin_cells)
        rows = corner[:, 0, None] + self._offsets
        cols = corner[:, 1, None] + self._offsets
        return rows[:, :, None], cols[:, None, :]

    def read(self, index: torch.Tensor, flip: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        """N x 1 x m x m maps in the batch's frame (cropped and flipped as the batch is)."""
        rows, cols = self._cells(crop)
        maps = self.maps[index[:, None, None], rows, cols]
        return torch.where(flip[:, None, None], maps.flip(-1), maps).unsqueeze(1)

    def write(self, index: torch.Tensor, flip: torch.Tensor, crop: torch.Tensor, logits: torch.Tensor) -> None:
        rows, cols = self._cells(crop)
        maps = logits.detach()[:, 0].float()
        self.maps[index[:, None, None], rows, cols] = torch.where(flip[:, None, None], maps.flip(-1), maps)
        self.owned[index] = True

    def state_dict(self) -> dict:
        return {"maps": self.maps, "owned": self.owned}

    def load_state_dict(self, state: dict) -> None:
        if state["maps"].shape != self.maps.shape:
            raise ValueError(
                f"ATME memory in the checkpoint has shape {tuple(state['maps'].shape)}, this run needs "
                f"{tuple(self.maps.shape)} (dataset size or image size changed)"
            )
        self.maps.copy_(state["maps"])
        self.owned.copy_(state["owned"])


def merge_memories(
    maps: torch.Tensor, owned: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-rank memories: each entry from the rank(s) that wrote it; unwritten entries stay local.

    `all_reduce` sums a tensor over ranks (and returns the sum). Returns (maps, owned).
    """
    weight = owned.float()
    total = all_reduce(maps * weight[:, None, None])
    writers = all_reduce(weight.clone())
    merged = torch.where(writers[:, None, None] > 0, total / writers.clamp(min=1)[:, None, None], maps)
    return merged, writers > 0


class ATMESampler(nn.Module):
    """Inference: the memory is a constant map (default logit 0, D = 1/2), so W_t is a constant
    computed once at export: G(x * (1 + W_t), mean W_t)."""

    nfe = 1

    def __init__(self, generator: nn.Module, corruption: torch.Tensor):
        super().__init__()
        self.generator = generator
        self.register_buffer("corruption", corruption)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        t = self.corruption.mean().expand(source.shape[0])
        return self.generator(source * (1 + self.corruption), t)


class ATME(Pix2Pix):
    default_betas = (0.5, 0.999)

    def __init__(
        self,
        model: ModelParams,
        dataset_size: int,
        device: torch.device,
        prepare: Prepare,
        autocast: Autocast,
        reduce: Reduce | None = None,
    ):
        super().__init__(model, dataset_size, device, prepare, autocast, reduce)
        method: ATMEParams = model.method
        self.W = prepare(build_w(model))
        self.memory = ATMEMemory(
            dataset_size,
            patch_map_size(model.image_size, method.discriminator.n_layers),
            2**method.discriminator.n_layers,
            model.crop_margin,
            device,
        )

    def build_generator(self) -> nn.Module:
        return build_ddpm_generator(self.model, self.model.source_channels, self.model.target_channels)

    def networks(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D, "W": self.W}

    def generator_parameters(self) -> list[nn.Parameter]:
        return [*self.G.parameters(), *self.W.parameters()]

    def generate(self, batch: Batch) -> torch.Tensor:
        maps = self.memory.read(batch["index"], batch["flip"], batch["crop"])
        corruption = self.W(maps.to(batch["source"].dtype))
        t = corruption.float().mean(dim=(1, 2, 3))
        return self.G(batch["source"] * (1 + corruption), t)

    def after_step(self, batch: Batch, stats: StatsCollector) -> None:
        self.memory.write(batch["index"], batch["flip"], batch["crop"], self._fake_logits)
        super().after_step(batch, stats)

    def make_sampler(self) -> nn.Module:
        method: ATMEParams = self.model.method
        size = self.memory.map_size
        constant = torch.full((1, 1, size, size), method.test_map_logit, device=self.device)
        w = unwrap(self.W)
        was_training = w.training
        w.eval()
        with torch.no_grad():
            corruption = w(constant)
        w.train(was_training)
        return ATMESampler(unwrap(self.G), corruption)

    def extra_state(self) -> dict:
        return {**super().extra_state(), "memory": self.memory.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.memory.load_state_dict(state["memory"])
