"""Group norm, per-sample FiLM and SiLU as one operation with a hand-written backward pass.

The DDPM U-Net's ResBlocks compute silu((1 + scale) * GroupNorm(x) + shift) twice each. Eager
PyTorch runs that as a group-norm kernel, an addcmul and a SiLU, each a full pass over the
activation in the forward and again in the backward, and autograd keeps the norm's output and
the SiLU's input for the backward pass. On ATME's U-Net at 256 px those passes, not the
convolutions, are most of a step (docs/benchmarks.md). Here:

- forward: one pass reads x for its per-channel moments, one reads x and writes the output.
  Every per-sample, per-channel factor (the norm's statistics, its affine, FiLM) is folded
  into one multiplier and one offset around the group mean, out = act((x - mean) * a + b),
  computed on (batch, channels) tensors (x * a' + b' would cancel away the precision of
  activations whose mean is large against their spread);
- backward: one pass sums the gradient per channel, one writes dx, both recomputing the SiLU
  from x. Only x (and the small factors) is kept, not the norm's output or the SiLU's input.
  Differentiated once more (a gradient penalty: R1 differentiates D's gradient), the backward
  pass runs as plain PyTorch ops on statistics recomputed from x, so autograd sees the whole
  gradient as a function of x and differentiates it exactly; only that phase pays for it.

Any 4-D layout whose height and width merge into one stride (NCHW and channels_last, NHWC)
is read in place, so channels_last needs no copy either. The statistics accumulate in
float32, also for bf16 activations, and are combined per group with Chan's formula, which
does not lose precision to large means as a sum of squares would.

The passes over the activations are four kernels. On CUDA they are the Triton kernels of
group_norm_triton.py; elsewhere (and as their reference in the tests) they are written in
PyTorch below. The arithmetic around them, the group statistics and the backward formula, is
plain autograd-free PyTorch on (batch, channels) tensors, shared by both.
"""

import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch.nn import functional as F


def triton_unavailable_reason() -> str | None:
    """Why Triton's CUDA kernels (these, and torch.compile's) cannot run here; None when they can.

    Triton comes with CUDA builds of PyTorch, but at its first kernel it builds its CUDA driver
    module with the system's C compiler against this Python's headers (cached afterwards), so a
    slim image without them fails there, in the middle of the first training step.
    """
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (CUDA builds of PyTorch bring it)"
    # Triton's own lookup: the compiler $CC names, else gcc, else clang on PATH.
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "Triton finds no C compiler to build its CUDA module with (gcc or clang on PATH, or $CC)"
    scheme = sysconfig.get_default_scheme()  # the headers Triton includes, found as Triton finds them
    include = Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])
    if not (include / "Python.h").exists():
        return (f"Triton builds its CUDA module against this Python's headers, and {include} has no Python.h "
                f"(the python{sysconfig.get_python_version()}-dev package)")
    return None


# ---------------------------------------------------------------- the four passes, in PyTorch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for bf16, fp16 and fp32 activations; float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _widened(x: torch.Tensor) -> torch.Tensor:
    return x.to(_compute_dtype(x))


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel, over height x width: the mean and the sum of squared deviations."""
    variance, mean = torch.var_mean(_widened(x), dim=(2, 3), correction=0)
    return mean, variance * (x.shape[2] * x.shape[3])


def _expand(factor: torch.Tensor) -> torch.Tensor:
    return factor[:, :, None, None]


def _activation_gradient(
    x: torch.Tensor, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, center: torch.Tensor, silu: bool
) -> torch.Tensor:
    """The gradient at the norm's output, (x - center) * a + b: grad_out through the SiLU, recomputed from x."""
    if not silu:
        return _widened(grad_out)
    pre = (_widened(x) - _expand(center)) * _expand(a) + _expand(b)
    sigmoid = torch.sigmoid(pre)
    return _widened(grad_out) * sigmoid * (1 + pre * (1 - sigmoid))


def affine_activation(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, center: torch.Tensor, silu: bool) -> torch.Tensor:
    """act((x - center) * a + b) in x's dtype and layout, a, b and center per sample and channel."""
    out = (_widened(x) - _expand(center)) * _expand(a) + _expand(b)
    return (F.silu(out) if silu else out).to(x.dtype)


def gradient_sums(
    x: torch.Tensor, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, center: torch.Tensor, silu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel: the sum of g and of g * (x - center), g the gradient at (x - center) * a + b."""
    grad = _activation_gradient(x, grad_out, a, b, center, silu)
    return grad.sum(dim=(2, 3)), (grad * (_widened(x) - _expand(center))).sum(dim=(2, 3))


def input_gradient(
    x: torch.Tensor, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, center: torch.Tensor,
    p: torch.Tensor, q: torch.Tensor, r: torch.Tensor, silu: bool,
) -> torch.Tensor:
    """dx = g * p + (x - center) * q + r in x's dtype and layout, g the gradient at (x - center) * a + b."""
    grad = _activation_gradient(x, grad_out, a, b, center, silu)
    return (grad * _expand(p) + (_widened(x) - _expand(center)) * _expand(q) + _expand(r)).to(x.dtype)


TORCH_PASSES = SimpleNamespace(
    channel_moments=channel_moments, affine_activation=affine_activation,
    gradient_sums=gradient_sums, input_gradient=input_gradient,
)


def combine_moments(
    means: torch.Tensor, m2s: torch.Tensor, counts: torch.Tensor | int, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and squared deviations of parts merged along `dim` (Chan's parallel formula),
    each part holding `counts` elements (broadcast against `means`): the parts' own squared
    deviations plus each part mean's deviation from the whole mean, weighted by its count."""
    counts = torch.as_tensor(counts, dtype=means.dtype, device=means.device).expand_as(means)
    mean = (means * counts).sum(dim, keepdim=True) / counts.sum(dim, keepdim=True)
    m2 = m2s.sum(dim) + (counts * (means - mean) ** 2).sum(dim)
    return mean.squeeze(dim), m2


def _passes(x: torch.Tensor) -> ModuleType | SimpleNamespace:
    """The kernels for x: Triton's on CUDA (the same four functions; float32 arithmetic, so not
    for float64), the PyTorch ones above elsewhere."""
    if x.is_cuda and x.dtype != torch.float64:
        from components.networks import group_norm_triton

        return group_norm_triton
    return TORCH_PASSES


# ---------------------------------------------------------------- the operation


def _per_channel(per_group: torch.Tensor, channels: int) -> torch.Tensor:
    return per_group.repeat_interleave(channels // per_group.shape[1], dim=1)


def _group_sum(per_channel: torch.Tensor, groups: int) -> torch.Tensor:
    return per_channel.view(per_channel.shape[0], groups, -1).sum(dim=-1)


def _statistics(passes: ModuleType | SimpleNamespace, x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The group mean and 1 / std of x, per sample and channel (each channel gets its group's)."""
    batch, channels, height, width = x.shape
    positions = height * width
    channel_mean, channel_m2 = passes.channel_moments(x)
    group_mean, group_m2 = combine_moments(
        channel_mean.view(batch, groups, -1), channel_m2.view(batch, groups, -1), positions, dim=-1)
    group_rstd = torch.rsqrt(group_m2 / (positions * channels // groups) + eps)
    return _per_channel(group_mean, channels), _per_channel(group_rstd, channels)


class _GroupNormActivation(torch.autograd.Function):
    """out = act(GroupNorm(x) * gamma + beta), gamma and beta per sample and channel (float32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, eps: float, silu: bool):
        passes = _passes(x)
        mean, rstd = _statistics(passes, x, groups, eps)
        a = rstd * gamma
        ctx.save_for_backward(x, gamma, beta, a, mean, rstd)
        ctx.groups, ctx.eps, ctx.silu = groups, eps, silu
        return passes.affine_activation(x, a, beta, mean, silu)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gamma, beta, a, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph: this gradient is differentiated once more (a gradient penalty). The
            # saved statistics are constants to autograd and the Triton kernels record nothing,
            # so both would make that derivative silently wrong. Recomputed from x by PyTorch
            # ops, the statistics and the formula below are one exact function of x, gamma,
            # beta and grad_out, which autograd differentiates.
            passes = TORCH_PASSES
            mean, rstd = _statistics(passes, x, ctx.groups, ctx.eps)
            a = rstd * gamma
        else:
            passes = _passes(x)
        grad_out = _merged_layout(grad_out)
        groups, channels = ctx.groups, x.shape[1]
        count = x.shape[2] * x.shape[3] * channels // groups
        grad_sum, grad_centered_sum = passes.gradient_sums(x, grad_out, a, beta, mean, ctx.silu)
        grad_beta = grad_sum
        grad_gamma = rstd * grad_centered_sum  # sum of g * normalised x
        # GroupNorm's backward, with d = g * gamma the gradient at the normalised x:
        # dx = rstd * (d - mean(d) - normalised x * mean(d * normalised x)), means over the group.
        mean_d = _per_channel(_group_sum(gamma * grad_sum, groups) / count, channels)
        mean_d_normalised = _per_channel(_group_sum(gamma * grad_gamma, groups) / count, channels)
        grad_x = None
        if ctx.needs_input_grad[0]:
            p, q, r = rstd * gamma, -rstd * rstd * mean_d_normalised, -rstd * mean_d
            grad_x = passes.input_gradient(x, grad_out, a, beta, mean, p, q, r, ctx.silu)
        return grad_x, grad_gamma, grad_beta, None, None, None


def _merged_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself where height and width merge into one stride (NCHW, NHWC), else a contiguous copy."""
    if x.shape[2] == 1 or x.stride(2) == x.shape[3] * x.stride(3):
        return x
    return x.contiguous()


def group_norm_activation(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """act((1 + scale) * (GroupNorm(x) * weight + bias) + shift) as one operation, act SiLU or none.

    x: (batch, channels, height, width); weight, bias: (channels,); scale, shift: (batch,
    channels) or (batch, channels, 1, 1), both or neither. Runs outside autocast, returns
    x's dtype (the statistics and factors are float32, float64 for float64 x).
    """
    if x.dim() != 4:
        raise ValueError(f"group_norm_activation takes a 4-D tensor, got shape {tuple(x.shape)}")
    if (scale is None) != (shift is None):
        raise ValueError("group_norm_activation takes scale and shift together")
    batch, channels = x.shape[:2]
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    dtype = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        gamma = (weight.to(dtype) if weight is not None else x.new_ones(channels, dtype=dtype)).expand(batch, channels)
        beta = (bias.to(dtype) if bias is not None else x.new_zeros(channels, dtype=dtype)).expand(batch, channels)
        if scale is not None:
            factor = 1 + scale.reshape(batch, channels).to(dtype)
            gamma, beta = gamma * factor, beta * factor + shift.reshape(batch, channels).to(dtype)
        return _GroupNormActivation.apply(_merged_layout(x), gamma.contiguous(), beta.contiguous(), groups, eps, silu)
