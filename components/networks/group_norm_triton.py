"""The four passes of fused_group_norm.py as Triton kernels (CUDA; the tests also run them in
Triton's interpreter on the CPU, and compile them for an H100 without one).

Each program takes a tile of positions x channels of one sample (the two reductions: a run of
such tiles). The tensor is addressed by three strides (sample, channel, position), so NCHW
tiles read along positions and channels_last tiles along channels, both coalesced, without a
copy. Arithmetic is float32; loads and stores are in the tensor's dtype. The per-sample,
per-channel factors (a, b, center, p, q, r) are contiguous (batch, channels) float32 tensors.
The reductions write one partial result per program, (batch, programs, channels), which
PyTorch combines: no atomics, so the sums are the same on every run.
"""

import torch
import triton
import triton.language as tl

from components.networks.fused_group_norm import combine_moments

# Elements per tile: enough work per program to hide memory latency, few enough registers to
# keep several programs per multiprocessor.
TILE_ELEMENTS = 4096
MAX_TILE_CHANNELS = 64
# Positions one program of a reduction covers, tile after tile: its partial results are
# 1/REDUCTION_POSITIONS of the tensor (at 256 px, 65,536 positions: 64 partials per channel).
REDUCTION_POSITIONS = 1024
# Multiply-adds fused into FMAs, as Triton has always compiled them (named: Triton 3.9 warns that
# its default is about to change).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def _tiling(x: torch.Tensor) -> tuple[int, int, int]:
    """(positions per tile, channels per tile, tiles over the positions of one sample)."""
    channels, positions = x.shape[1], x.shape[2] * x.shape[3]
    block_channels = min(triton.next_power_of_2(channels), MAX_TILE_CHANNELS)
    block_positions = min(TILE_ELEMENTS // block_channels, triton.next_power_of_2(positions))
    return block_positions, block_channels, triton.cdiv(positions, block_positions)


def _reduction_tiling(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(positions per tile, channels per tile, tiles per program, programs over the positions of one sample)."""
    block_positions, block_channels, tiles = _tiling(x)
    chunk = max(1, min(REDUCTION_POSITIONS // block_positions, tiles))
    return block_positions, block_channels, chunk, triton.cdiv(tiles, chunk)


def _strides(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(sample, channel, position) strides; fused_group_norm hands over tensors whose height and width merge."""
    return tensor.stride(0), tensor.stride(1), tensor.stride(3)


@triton.jit
def _tile(row, tile_channel, channels, positions, tiles, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """row = sample * tiles + tile of positions; tile_channel: which BLOCK_C channels."""
    sample = row // tiles
    position = (row % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    channel = tile_channel * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (position < positions)[:, None] & (channel < channels)[None, :]
    return sample, position, channel, mask


@triton.jit
def _offsets(sample, position, channel, stride_n, stride_c, stride_p):
    """Element offsets of a (positions, channels) tile of one tensor, by its three strides."""
    return (sample.to(tl.int64) * stride_n + channel[None, :].to(tl.int64) * stride_c
            + position[:, None].to(tl.int64) * stride_p)


@triton.jit
def _load_factors(a_ptr, b_ptr, center_ptr, sample, channel, channels):
    """Three per-sample, per-channel factors, (batch, channels) float32, for one tile's channels."""
    factor = sample * channels + channel
    valid = channel < channels
    a = tl.load(a_ptr + factor, mask=valid, other=0.0)
    b = tl.load(b_ptr + factor, mask=valid, other=0.0)
    center = tl.load(center_ptr + factor, mask=valid, other=0.0)
    return a, b, center


@triton.jit
def _activation_gradient(x, grad_out, a, b, center, SILU: tl.constexpr):
    grad = grad_out
    if SILU:
        pre = (x - center[None, :]) * a[None, :] + b[None, :]
        sigmoid = tl.sigmoid(pre)
        grad = grad_out * sigmoid * (1.0 + pre * (1.0 - sigmoid))
    return grad


@triton.jit
def _moments_kernel(x_ptr, mean_ptr, m2_ptr, channels, positions, programs, stride_n, stride_c, stride_p,
                    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # CHUNK tiles of positions, each tile's mean and squared deviations merged into the
    # running ones by Chan's formula (no sum of squares: no cancellation on large means).
    row = tl.program_id(0)
    sample, part = row // programs, row % programs
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    count = 0.0
    for step in range(CHUNK):
        tile = part * CHUNK + step
        _, position, channel, mask = _tile(sample * (programs * CHUNK) + tile, tl.program_id(1), channels, positions,
                                           programs * CHUNK, BLOCK_P, BLOCK_C)
        x = tl.load(x_ptr + _offsets(sample, position, channel, stride_n, stride_c, stride_p), mask=mask, other=0.0)
        x = x.to(tl.float32)
        tile_count = tl.maximum(tl.minimum(positions - tile * BLOCK_P, BLOCK_P), 0).to(tl.float32)
        tile_mean = tl.sum(x, axis=0) / tl.maximum(tile_count, 1.0)
        deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
        total = count + tile_count
        weight = tile_count / tl.maximum(total, 1.0)
        delta = tile_mean - mean
        m2 += tl.sum(deviation * deviation, axis=0) + delta * delta * count * weight
        mean += delta * weight
        count = total
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    out = row * channels + channel
    tl.store(mean_ptr + out, mean, mask=channel < channels)
    tl.store(m2_ptr + out, m2, mask=channel < channels)


@triton.jit
def _affine_activation_kernel(x_ptr, out_ptr, a_ptr, b_ptr, center_ptr, channels, positions, tiles,
                              stride_n, stride_c, stride_p, out_stride_n, out_stride_c, out_stride_p,
                              SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    sample, position, channel, mask = _tile(tl.program_id(0), tl.program_id(1), channels, positions, tiles,
                                            BLOCK_P, BLOCK_C)
    a, b, center = _load_factors(a_ptr, b_ptr, center_ptr, sample, channel, channels)
    x = tl.load(x_ptr + _offsets(sample, position, channel, stride_n, stride_c, stride_p), mask=mask, other=0.0)
    out = (x.to(tl.float32) - center[None, :]) * a[None, :] + b[None, :]
    if SILU:
        out = out * tl.sigmoid(out)
    out_offsets = _offsets(sample, position, channel, out_stride_n, out_stride_c, out_stride_p)
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gradient_sums_kernel(x_ptr, grad_ptr, a_ptr, b_ptr, center_ptr, sum_ptr, centered_sum_ptr,
                          channels, positions, programs, stride_n, stride_c, stride_p,
                          grad_stride_n, grad_stride_c, grad_stride_p,
                          SILU: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    sample, part = row // programs, row % programs
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    a, b, center = _load_factors(a_ptr, b_ptr, center_ptr, sample, channel, channels)
    grad_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    centered_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for step in range(CHUNK):
        _, position, _, mask = _tile(sample * (programs * CHUNK) + part * CHUNK + step, tl.program_id(1), channels,
                                     positions, programs * CHUNK, BLOCK_P, BLOCK_C)
        x = tl.load(x_ptr + _offsets(sample, position, channel, stride_n, stride_c, stride_p), mask=mask, other=0.0)
        grad_offsets = _offsets(sample, position, channel, grad_stride_n, grad_stride_c, grad_stride_p)
        grad_out = tl.load(grad_ptr + grad_offsets, mask=mask, other=0.0).to(tl.float32)
        x = x.to(tl.float32)
        grad = tl.where(mask, _activation_gradient(x, grad_out, a, b, center, SILU), 0.0)
        grad_sum += tl.sum(grad, axis=0)
        centered_sum += tl.sum(grad * (x - center[None, :]), axis=0)
    out = row * channels + channel
    tl.store(sum_ptr + out, grad_sum, mask=channel < channels)
    tl.store(centered_sum_ptr + out, centered_sum, mask=channel < channels)


@triton.jit
def _input_gradient_kernel(x_ptr, grad_ptr, dx_ptr, a_ptr, b_ptr, center_ptr, p_ptr, q_ptr, r_ptr,
                           channels, positions, tiles, stride_n, stride_c, stride_p,
                           grad_stride_n, grad_stride_c, grad_stride_p, dx_stride_n, dx_stride_c, dx_stride_p,
                           SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    sample, position, channel, mask = _tile(tl.program_id(0), tl.program_id(1), channels, positions, tiles,
                                            BLOCK_P, BLOCK_C)
    a, b, center = _load_factors(a_ptr, b_ptr, center_ptr, sample, channel, channels)
    p, q, r = _load_factors(p_ptr, q_ptr, r_ptr, sample, channel, channels)
    x = tl.load(x_ptr + _offsets(sample, position, channel, stride_n, stride_c, stride_p), mask=mask, other=0.0)
    grad_offsets = _offsets(sample, position, channel, grad_stride_n, grad_stride_c, grad_stride_p)
    grad_out = tl.load(grad_ptr + grad_offsets, mask=mask, other=0.0).to(tl.float32)
    x = x.to(tl.float32)
    grad = _activation_gradient(x, grad_out, a, b, center, SILU)
    dx = grad * p[None, :] + (x - center[None, :]) * q[None, :] + r[None, :]
    dx_offsets = _offsets(sample, position, channel, dx_stride_n, dx_stride_c, dx_stride_p)
    tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(x: torch.Tensor, block_channels: int, tiles: int) -> tuple[int, int]:
    return x.shape[0] * tiles, triton.cdiv(x.shape[1], block_channels)


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel: the mean and the sum of squared deviations over the positions (float32)."""
    batch, channels = x.shape[:2]
    positions = x.shape[2] * x.shape[3]
    block_positions, block_channels, chunk, programs = _reduction_tiling(x)
    part_mean = torch.empty(batch, programs, channels, device=x.device, dtype=torch.float32)
    part_m2 = torch.empty_like(part_mean)
    _moments_kernel[_grid(x, block_channels, programs)](
        x, part_mean, part_m2, channels, positions, programs, *_strides(x),
        CHUNK=chunk, BLOCK_P=block_positions, BLOCK_C=block_channels, **LAUNCH_OPTIONS)
    # each program covers chunk tiles of positions, except the last
    span = chunk * block_positions
    counts = torch.full((programs, 1), float(span), device=x.device)
    counts[-1] = positions - (programs - 1) * span
    return combine_moments(part_mean, part_m2, counts, dim=1)


def affine_activation(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, center: torch.Tensor, silu: bool) -> torch.Tensor:
    """act((x - center) * a + b) in x's dtype and layout, a, b and center per sample and channel."""
    out = torch.empty_like(x)
    block_positions, block_channels, tiles = _tiling(x)
    _affine_activation_kernel[_grid(x, block_channels, tiles)](
        x, out, a, b, center, x.shape[1], x.shape[2] * x.shape[3], tiles, *_strides(x), *_strides(out),
        SILU=silu, BLOCK_P=block_positions, BLOCK_C=block_channels, **LAUNCH_OPTIONS)
    return out


def gradient_sums(
    x: torch.Tensor, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, center: torch.Tensor, silu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel: the sum of g and of g * (x - center), g the gradient at (x - center) * a + b."""
    batch, channels = x.shape[:2]
    block_positions, block_channels, chunk, programs = _reduction_tiling(x)
    part_sum = torch.empty(batch, programs, channels, device=x.device, dtype=torch.float32)
    part_centered_sum = torch.empty_like(part_sum)
    _gradient_sums_kernel[_grid(x, block_channels, programs)](
        x, grad_out, a, b, center, part_sum, part_centered_sum, channels, x.shape[2] * x.shape[3], programs,
        *_strides(x), *_strides(grad_out), SILU=silu, CHUNK=chunk, BLOCK_P=block_positions, BLOCK_C=block_channels, **LAUNCH_OPTIONS)
    return part_sum.sum(dim=1), part_centered_sum.sum(dim=1)


def input_gradient(
    x: torch.Tensor, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, center: torch.Tensor,
    p: torch.Tensor, q: torch.Tensor, r: torch.Tensor, silu: bool,
) -> torch.Tensor:
    """dx = g * p + (x - center) * q + r in x's dtype and layout, g the gradient at (x - center) * a + b."""
    dx = torch.empty_like(x)
    block_positions, block_channels, tiles = _tiling(x)
    _input_gradient_kernel[_grid(x, block_channels, tiles)](
        x, grad_out, dx, a, b, center, p, q, r,
        x.shape[1], x.shape[2] * x.shape[3], tiles, *_strides(x), *_strides(grad_out), *_strides(dx),
        SILU=silu, BLOCK_P=block_positions, BLOCK_C=block_channels, **LAUNCH_OPTIONS)
    return dx
