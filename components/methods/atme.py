"""ATME (Solano-Carrillo et al., CVPRW 2023): G sees the source corrupted by W(D's last map for this sample).

Per step (the reference's `optimize_parameters`, pix2pix's order): read this sample's stored
D logit map, W maps it to (-1, 1) at image size, the source is corrupted as x_t = x * (1 + W_t)
and G(x_t, mean W_t) makes the fake (G never sees the clean x); D's step on it; G's step
against the updated D; then the logits that the *updated* D gave the fake in G's step are
written back for the sample. Everything else (D, losses, optional Diffusion-GAN) is pix2pix's.
G and W are initialised N(0, 0.02) as in the reference (`init_net`).

The memory is kept in the un-augmented frame: maps are stored un-flipped, on a canvas that
covers the whole load_size image, at the crop's position (rounded to D's patch stride), so a
sample read under another crop or flip gets the map of the same image region.
Batch["crop"] is the corner in the resized image before the flip (the pix2pix order).
"""

import torch
from torch import nn

from components.config.model import ATMEParams, ModelParams
from components.data.batch import Batch
from components.methods.base import MethodContext, Player, Reduce, Sampler, unwrap
from components.methods.pix2pix import Pix2Pix
from components.networks.atme_w import ATMEW
from components.networks.ddpm_unet import DDPMUNet
from components.networks.init import init_normal_
from components.networks.pix2pix import patch_map_size
from components.training_stats import StatsCollector


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
    """D's logit map per dataset sample, in the un-augmented frame.

    `owned[i]` is True once this process wrote sample i; `loaded[i]` once the state it was
    loaded from held a written entry i. Under data parallelism each rank sees a fixed subset
    of samples, so each rank owns those entries; a gathered state (`merge_memories`) takes
    each entry from the rank that wrote it. Its "owned" is every entry ever written.
    """

    def __init__(self, dataset_size: int, map_size: int, patch_stride: int, crop_margin: int, device: torch.device):
        self.map_size = map_size
        self.patch_stride = patch_stride
        self.margin_cells = -(-crop_margin // patch_stride)
        canvas = map_size + self.margin_cells
        # U[0, 1) as the reference initialises it.
        self.maps = torch.rand(dataset_size, canvas, canvas, device=device)
        self.owned = torch.zeros(dataset_size, dtype=torch.bool, device=device)
        self.loaded = torch.zeros(dataset_size, dtype=torch.bool, device=device)
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

    def state_dict(self, gather: Reduce | None = None) -> dict:
        """With `gather` (a sum over workers, a collective), the memory merged over the workers."""
        if gather is None:
            return {"maps": self.maps, "owned": self.owned | self.loaded}
        maps, written = merge_memories(self.maps, self.owned, gather)
        return {"maps": maps, "owned": written | self.loaded}

    def load_state_dict(self, state: dict) -> None:
        if state["maps"].shape != self.maps.shape:
            raise ValueError(
                f"ATME memory in the checkpoint has shape {tuple(state['maps'].shape)}, this run needs "
                f"{tuple(self.maps.shape)} (dataset size or image size changed)"
            )
        self.maps.copy_(state["maps"])
        # The loaded entries are the same on every worker; `owned` counts only what this
        # process writes from now on, so a later gather never averages a loaded entry with a new one.
        self.loaded.copy_(state["owned"])
        self.owned.zero_()


def merge_memories(maps: torch.Tensor, owned: torch.Tensor, all_reduce: Reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-rank memories: each entry from the rank(s) that wrote it; unwritten entries stay local.

    `all_reduce` sums a tensor over ranks (and returns the sum). Returns (maps, owned).
    """
    weight = owned.float()
    total = all_reduce(maps * weight[:, None, None])
    writers = all_reduce(weight.clone())
    merged = torch.where(writers[:, None, None] > 0, total / writers.clamp(min=1)[:, None, None], maps)
    return merged, writers > 0


class ATMESampler(Sampler):
    """Inference: the memory is a constant map (default logit 0, D = 1/2), so W_t is a constant
    computed once at export: G(x * (1 + W_t), mean W_t)."""

    def __init__(self, generator: nn.Module, corruption: torch.Tensor):
        super().__init__()
        self.generator = generator
        self.register_buffer("corruption", corruption)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        t = self.corruption.mean().expand(source.shape[0])
        return self.generator(source * (1 + self.corruption), t)


class ATME(Pix2Pix):
    default_betas = (0.5, 0.999)
    default_lr_schedule = "linear_decay"

    def __init__(self, context: MethodContext):
        super().__init__(context)
        model = context.model
        method: ATMEParams = model.method
        self.W = context.prepare(init_normal_(build_w(model)))
        self.memory = ATMEMemory(
            context.dataset_size,
            patch_map_size(model.image_size, method.discriminator.n_layers),
            2**method.discriminator.n_layers,
            model.crop_margin,
            context.device,
        )

    def build_generator(self) -> nn.Module:
        return init_normal_(build_ddpm_generator(self.model, self.model.source_channels, self.model.target_channels))

    def networks(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D, "W": self.W}

    def parameters_of(self, player: Player) -> list[nn.Parameter]:
        return [*self.G.parameters(), *self.W.parameters()] if player == "G" else list(self.D.parameters())

    def generate(self, batch: Batch) -> torch.Tensor:
        maps = self.memory.read(batch["index"], batch["flip"], batch["crop"])
        corruption = self.W(maps.to(batch["source"].dtype))
        t = corruption.float().mean(dim=(1, 2, 3))
        return self.G(batch["source"] * (1 + corruption), t)

    def after_step(self, batch: Batch, stats: StatsCollector) -> None:
        # The updated D's logits on this step's fake, from G's step (the reference's `disc_B`).
        self.memory.write(batch["index"], batch["flip"], batch["crop"], self._fake_logits)
        super().after_step(batch, stats)

    def make_sampler(self) -> Sampler:
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

    @classmethod
    def untrained_sampler(cls, model: ModelParams) -> Sampler:
        generator = build_ddpm_generator(model, model.source_channels, model.target_channels)
        return ATMESampler(generator, torch.zeros(1, 1, model.image_size, model.image_size))

    def extra_state(self, gather: Reduce | None = None) -> dict:
        return {**super().extra_state(gather), "memory": self.memory.state_dict(gather)}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.memory.load_state_dict(state["memory"])
