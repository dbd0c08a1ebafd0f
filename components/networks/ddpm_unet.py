"""The DDPM-style U-Net: ATME's generator and, with a latent z and a condition, DDGAN's.

Written for throughput as well as correctness (the reference ATME spends its time on
memory-bound work): plain convolutions (no weight standardisation), group norms with float32
statistics that keep bf16 activations in bf16, linear attention as batched matmuls on views
(no einsum reshapes at full resolution), and `F.scaled_dot_product_attention` for the full
attention in the middle. ResBlock, LinearAttention and FullAttention are the repeated blocks
that components/training/performance.py compiles and checkpoints one by one.
"""

import torch
from torch import nn
from torch.nn import functional as F

from components.networks.embedding import sinusoidal_embedding
from components.networks.norms import GroupNorm


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm with FiLM(time) -> SiLU -> conv, plus a skip.

    With a latent embedding, the first norm is adaptive: (1 + gamma(z)) * GN(h) + beta(z).
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int, latent_dim: int | None, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.latent_projection = nn.Linear(latent_dim, 2 * in_channels) if latent_dim else None
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_projection = nn.Linear(embed_dim, 2 * out_channels)
        self.norm2 = GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor, latent: torch.Tensor | None) -> torch.Tensor:
        gamma = beta = None
        if self.latent_projection is not None:
            gamma, beta = self.latent_projection(latent)[:, :, None, None].chunk(2, dim=1)
        h = self.conv1(self.norm1(x, gamma, beta, silu=True))
        scale, shift = self.time_projection(time)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.dropout(self.norm2(h, scale, shift, silu=True)))
        return h + self.skip(x)


class LinearAttention(nn.Module):
    """Pre-norm linear attention (softmax over features for q, over positions for k), residual.

    Works in the layout of its input, so that full-resolution tensors are not copied: q, k and
    v come from one 1x1 convolution each (slices of one `qkv` weight) and are used as views.
    - NCHW: channel-major, (batch, heads, dim, positions); both products are batched matmuls
      per head, and the result is NCHW for the output convolution.
    - channels_last: position-major, (batch, positions, heads x dim). A matmul per head would
      need a copy there (heads and batch do not merge into one batch dimension), so the
      products run over all heads at once: the heads x dim square context holds every pair of
      heads, the pairs of different heads are zeroed, and q times it is the attention of each
      head, already NHWC. With 4 heads that is 4x the products' arithmetic (3% more for
      ATME's step at 256 px), against copies of q, k, v and the result, and of their
      gradients; k alone is copied, for its softmax over the positions (`_position_major`).
    """

    def __init__(self, channels: int, heads: int, head_dim: int, groups: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * heads * head_dim, 1, bias=False)
        self.out = nn.Sequential(nn.Conv2d(heads * head_dim, channels, 1), GroupNorm(1, channels))
        # 1/sqrt(d) on the blocks of one head with itself, 0 between heads; not saved with the weights
        same_head = torch.block_diag(*[torch.ones(head_dim, head_dim)] * heads)
        self.register_buffer("head_blocks", same_head * head_dim**-0.5, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        projections = [F.conv2d(normed, weight) for weight in self.qkv.weight.chunk(3)]
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            attended = self._position_major(*projections)
        else:
            attended = self._channel_major(*projections)
        return x + self.out(attended)

    def _channel_major(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = q.shape
        shape = (batch, self.heads, self.head_dim, height * width)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        # Softmax in the activations' dtype: under bf16 autocast it would return, and keep for
        # the backward pass, float32 copies of q and k at full resolution (the kernel
        # accumulates in float32 either way).
        with torch.autocast(q.device.type, enabled=False):
            q = q.softmax(dim=-2)
            k = k.softmax(dim=-1)
        # heads x dim x dim context: the cost is linear in the number of positions. The 1/sqrt(d)
        # of q is applied to this small matrix instead of to q.
        context = torch.matmul(k, v.transpose(-2, -1)) * self.head_dim**-0.5
        attended = torch.matmul(context.transpose(-2, -1), q)  # batch x heads x dim x positions
        return attended.reshape(batch, channels, height, width)

    def _position_major(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = q.shape

        def positions_by_channels(projection: torch.Tensor) -> torch.Tensor:  # a view of the NHWC tensor
            return projection.permute(0, 2, 3, 1).reshape(batch, height * width, channels)

        q, k, v = positions_by_channels(q), positions_by_channels(k), positions_by_channels(v)
        with torch.autocast(q.device.type, enabled=False):  # as in _channel_major
            q = q.view(batch, height * width, self.heads, self.head_dim).softmax(dim=-1).view_as(v)
            # k's softmax runs over the positions, so k is copied channel-major for it: CUDA's
            # softmax over a middle dimension gives each channel one thread that walks all the
            # positions (32 blocks of 128 threads at 256 px), far slower than the copy.
            k = k.transpose(1, 2).contiguous().softmax(dim=-1)  # batch x (heads x dim) x positions
        context = torch.bmm(k, v) * self.head_blocks.to(v.dtype)
        attended = torch.bmm(q, context)  # batch x positions x (heads x dim)
        return attended.view(batch, height, width, channels).permute(0, 3, 1, 2)


class FullAttention(nn.Module):
    """Pre-norm multi-head softmax attention over all positions (used at the lowest resolution).

    `use_sdpa` (on by default): `F.scaled_dot_product_attention`, which picks a fused kernel
    (flash or memory-efficient attention) and never stores the positions x positions
    weights; off: the same attention written out, softmax(q k^T / sqrt(d)) v.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, groups: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.use_sdpa = True
        self.norm = GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * heads * head_dim, 1, bias=False)
        self.out = nn.Conv2d(heads * head_dim, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(batch, height * width, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # batch x heads x positions x dim
        if self.use_sdpa:
            attended = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = torch.matmul(q, k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)
            attended = torch.matmul(weights.to(v.dtype), v)
        attended = attended.transpose(1, 2)
        attended = attended.reshape(batch, height, width, self.heads * self.head_dim)
        return x + self.out(attended.permute(0, 3, 1, 2))


class Level(nn.Module):
    """One resolution of the U-Net: ResBlocks, optional linear attention after the last."""

    def __init__(self, blocks: list[ResBlock], attention: nn.Module | None, resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attention = attention if attention is not None else nn.Identity()
        self.resample = resample


class Upsample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DDPMUNet(nn.Module):
    """U-Net with a scalar time input: G(image, t) or, for DDGAN, G(cat(y_{t+1}, x), t, z).

    Layout as the reference (lucidrains' denoising-diffusion U-Net that ATME uses): a 7x7
    stem, per level `blocks_per_level` ResBlocks each feeding a skip, linear attention where
    configured, a stride-2 downsampling; ResBlock / full attention / ResBlock in the middle;
    the mirror on the way up; a final ResBlock on the stem's output and a 1x1 conv, tanh.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int = 64,
        channel_multipliers: tuple[int, ...] = (1, 2, 4, 8),
        attention_levels: tuple[int, ...] = (0, 1, 2, 3),
        blocks_per_level: int = 2,
        groups: int = 8,
        attention_heads: int = 4,
        attention_head_dim: int = 32,
        dropout: float = 0.0,
        latent_dim: int | None = None,
    ):
        super().__init__()
        self.width = width
        embed_dim = 4 * width
        self.stem = nn.Conv2d(in_channels, width, 7, padding=3)
        self.time_mlp = nn.Sequential(nn.Linear(width, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        # The latent goes through a small mapping network first (as DDGAN's z mapping).
        self.latent_mlp = (
            nn.Sequential(nn.Linear(latent_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim), nn.SiLU())
            if latent_dim
            else None
        )
        latent_embed = embed_dim if latent_dim else None

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embed_dim, groups, latent_embed, dropout)

        def linear_attention(channels: int, level: int) -> nn.Module | None:
            return LinearAttention(channels, attention_heads, attention_head_dim, groups) if level in attention_levels else None

        dims = [width * multiplier for multiplier in channel_multipliers]
        inputs = [width, *dims[:-1]]
        last = len(dims) - 1
        self.downs = nn.ModuleList()
        for level, (cin, cout) in enumerate(zip(inputs, dims)):
            resample = nn.Conv2d(cin, cout, 4, 2, 1) if level < last else nn.Conv2d(cin, cout, 3, padding=1)
            blocks = [res_block(cin, cin) for _ in range(blocks_per_level)]
            self.downs.append(Level(blocks, linear_attention(cin, level), resample))
        middle = dims[-1]
        self.mid_block1 = res_block(middle, middle)
        self.mid_attention = FullAttention(middle, attention_heads, attention_head_dim, groups)
        self.mid_block2 = res_block(middle, middle)
        self.ups = nn.ModuleList()
        for level in range(last, -1, -1):
            cin, cout = inputs[level], dims[level]
            resample = Upsample(cout, cin) if level > 0 else nn.Conv2d(cout, cin, 3, padding=1)
            blocks = [res_block(cout + cin, cout) for _ in range(blocks_per_level)]
            self.ups.append(Level(blocks, linear_attention(cout, level), resample))
        self.final_block = res_block(2 * width, width)
        self.final_conv = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        time = self.time_mlp(sinusoidal_embedding(t, self.width))
        latent = self.latent_mlp(z) if self.latent_mlp is not None else None
        x = self.stem(x)
        stem = x
        skips = []
        for level in self.downs:
            for index, block in enumerate(level.blocks):
                x = block(x, time, latent)
                if index == len(level.blocks) - 1:
                    x = level.attention(x)
                skips.append(x)
            x = level.resample(x)
        x = self.mid_block2(self.mid_attention(self.mid_block1(x, time, latent)), time, latent)
        for level in self.ups:
            for index, block in enumerate(level.blocks):
                x = block(torch.cat([x, skips.pop()], dim=1), time, latent)
                if index == len(level.blocks) - 1:
                    x = level.attention(x)
            x = level.resample(x)
        x = self.final_block(torch.cat([x, stem], dim=1), time, latent)
        return torch.tanh(self.final_conv(x))
