"""Runs the fused group norm's Triton kernels in Triton's interpreter (TRITON_INTERPRET=1, set
by the caller before Triton is imported) on the CPU, against the PyTorch passes and against
the unfused norm, FiLM and SiLU; exits 1 naming the first case that differs.

tests/methods/test_fused_group_norm.py runs it in a process of its own: the interpreter is
chosen when a kernel is defined, so it cannot be switched on in the test process.
"""

import itertools
import os
import sys

import torch
from torch.nn import functional as F

from components.networks import fused_group_norm, group_norm_triton

# (batch, channels, height, width, groups): channels not a power of two, a channel tile
# narrower than the channels (MAX_TILE_CHANNELS) and a reduction over several tiles, one row,
# and reductions over several programs whose last one ends in a cut tile and empty ones
# (1,221 positions: tiles of 64, 16 tiles per program).
SHAPES = ((2, 24, 5, 7, 4), (2, 80, 16, 16, 8), (3, 8, 1, 9, 2), (2, 64, 33, 37, 8))
LAYOUTS = ("NCHW", "channels_last", "channel slice")


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    # bf16 results may differ by one rounding step of the stored value
    tolerance = {"rtol": 2**-7, "atol": 2**-7} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(actual.float(), expected.float(), **tolerance, msg=lambda text: f"{name}: {text}")


def in_layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """NCHW, channels_last, or every other channel of a tensor twice as wide: height and width
    still merge, but the tensor is not dense, so the outputs (empty_like) get other strides."""
    if layout == "channels_last":
        return tensor.to(memory_format=torch.channels_last)
    if layout == "channel slice":
        wide = torch.zeros(tensor.shape[0], 2 * tensor.shape[1], *tensor.shape[2:], dtype=tensor.dtype)
        wide[:, 0::2] = tensor
        return wide[:, 0::2]
    return tensor


def check_passes(shape: tuple[int, ...], dtype: torch.dtype, layout: str, silu: bool) -> None:
    batch, channels, height, width, _ = shape
    x = in_layout(torch.randn(batch, channels, height, width).mul(2).add(1).to(dtype), layout)
    grad_out = in_layout(torch.randn(batch, channels, height, width).to(dtype), layout)
    a, b, center, p, q, r = (torch.randn(batch, channels) for _ in range(6))
    case = f"{tuple(shape)} {dtype} {layout} silu={silu}"
    for name in ("channel_moments", "gradient_sums"):
        arguments = (x,) if name == "channel_moments" else (x, grad_out, a, b, center, silu)
        for actual, expected in zip(getattr(group_norm_triton, name)(*arguments), getattr(fused_group_norm, name)(*arguments)):
            # sums over up to 256 positions of float32 products
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-3, msg=lambda text, name=name: f"{case} {name}: {text}")
    for name, arguments in (("affine_activation", (x, a, b, center, silu)),
                            ("input_gradient", (x, grad_out, a, b, center, p, q, r, silu))):
        actual = getattr(group_norm_triton, name)(*arguments)
        if actual.stride() != torch.empty_like(x).stride():
            raise AssertionError(f"{case} {name}: strides {actual.stride()}, empty_like(x)'s are {torch.empty_like(x).stride()}")
        _close(f"{case} {name}", actual, getattr(fused_group_norm, name)(*arguments), dtype)


def check_operation(shape: tuple[int, ...], layout: str) -> None:
    """The whole operation with the Triton passes, forward and backward, against the unfused ops
    (float32); and its second-order gradient (R1's), whose backward pass runs as PyTorch ops
    after the Triton forward."""
    batch, channels, height, width, groups = shape
    x = (torch.randn(batch, channels, height, width) * 3 + 5).requires_grad_()
    weight, bias = torch.randn(channels, requires_grad=True), torch.randn(channels, requires_grad=True)
    scale, shift = torch.randn(batch, channels, 1, 1, requires_grad=True), torch.randn(batch, channels, 1, 1, requires_grad=True)
    inputs = (x, weight, bias, scale, shift)
    expected = F.silu(torch.addcmul(shift, F.group_norm(x, groups, weight, bias, 1e-5), 1 + scale))
    fused_group_norm._passes = lambda tensor: group_norm_triton
    actual = fused_group_norm.group_norm_activation(in_layout(x, layout), groups, weight, bias, 1e-5, scale, shift, silu=True)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    actual_grads = torch.autograd.grad(actual, inputs, grad)
    case = f"operation {tuple(shape)} {layout}"
    _close(case, actual, expected, torch.float32)
    for name, a, e in zip(("x", "weight", "bias", "scale", "shift"), actual_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=2e-4, msg=lambda text, name=name: f"{case} grad {name}: {text}")

    def penalty_gradients(output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (gradient,) = torch.autograd.grad(output, x, grad, create_graph=True)
        return torch.autograd.grad(gradient.square().sum(), inputs)

    actual = fused_group_norm.group_norm_activation(in_layout(x, layout), groups, weight, bias, 1e-5, scale, shift, silu=True)
    expected = F.silu(torch.addcmul(shift, F.group_norm(x, groups, weight, bias, 1e-5), 1 + scale))
    for name, a, e in zip(("x", "weight", "bias", "scale", "shift"), penalty_gradients(actual), penalty_gradients(expected)):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3, msg=lambda text, name=name: f"{case} second order {name}: {text}")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1: the kernels run in Triton's interpreter on the CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cases = 0
    for shape, dtype, layout, silu in itertools.product(SHAPES, (torch.float32, torch.bfloat16), LAYOUTS, (False, True)):
        check_passes(shape, dtype, layout, silu)
        cases += 1
    for shape, layout in itertools.product(SHAPES, LAYOUTS):
        check_operation(shape, layout)
        cases += 1
    print(f"triton kernels match: {cases} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
