"""The fused group norm + FiLM + SiLU (components/networks/fused_group_norm.py): its hand-written
backward pass against autograd's, in float64; against the unfused ops in every layout; its
statistics on activations with a large mean; bad inputs; the Triton kernels in Triton's
interpreter (where Triton is installed) and on CUDA."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from components.networks import fused_group_norm
from components.networks.fused_group_norm import group_norm_activation
from components.networks.norms import GroupNorm, InstanceNorm

TESTS = Path(__file__).resolve().parents[1]
REPOSITORY = TESTS.parent


def unfused(x, groups, weight, bias, eps, scale=None, shift=None, silu=False):
    h = F.group_norm(x, groups, weight, bias, eps)
    if scale is not None:
        h = torch.addcmul(shift, h, 1 + scale)
    return F.silu(h) if silu else h


def inputs(batch=2, channels=6, height=3, width=5, dtype=torch.float64, channels_last=False, film=True):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, height, width, dtype=dtype) * 3 + 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = torch.randn(channels, dtype=dtype), torch.randn(channels, dtype=dtype)
    scale = torch.randn(batch, channels, 1, 1, dtype=dtype) if film else None
    shift = torch.randn(batch, channels, 1, 1, dtype=dtype) if film else None
    return [tensor.requires_grad_() if tensor is not None else None for tensor in (x, weight, bias, scale, shift)]


def as_checkable(x, weight, bias, scale, shift, silu):
    """The fused operation (3 groups) as a function of its tensors alone, and those tensors, for gradcheck."""
    differentiable = [tensor for tensor in (x, weight, bias, scale, shift) if tensor is not None]

    def fused(*tensors):
        x, weight, bias, *film_factors = tensors
        return group_norm_activation(x, 3, weight, bias, 1e-5, *(film_factors or (None, None)), silu=silu)

    return fused, differentiable


def penalty_gradients(norm, x, groups, weight, bias, scale, shift, wrt) -> tuple[torch.Tensor, ...]:
    """As R1: the gradient at x of a norm's (with SiLU) squared output, with its graph, squared;
    then that penalty's gradients with respect to `wrt`."""
    (gradient,) = torch.autograd.grad(
        norm(x, groups, weight, bias, 1e-5, scale, shift, silu=True).square().sum(), x, create_graph=True)
    return torch.autograd.grad(gradient.square().sum(), wrt)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("film", [False, True], ids=["no_film", "film"])
@pytest.mark.parametrize("silu", [False, True], ids=["no_silu", "silu"])
def test_backward_pass_matches_autograd_in_float64(channels_last, film, silu):
    x, weight, bias, scale, shift = inputs(channels_last=channels_last, film=film)
    fused, differentiable = as_checkable(x, weight, bias, scale, shift, silu)
    assert torch.autograd.gradcheck(fused, differentiable)
    expected = unfused(x, 3, weight, bias, 1e-5, scale, shift, silu)
    torch.testing.assert_close(fused(*differentiable), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("film", [False, True], ids=["no_film", "film"])
def test_a_second_order_gradient_through_it_is_autograds_and_the_unfused_ops(channels_last, film):
    # A gradient penalty (R1) differentiates a network's gradient once more. The hand-written
    # backward pass keeps the statistics as constants (and on CUDA runs Triton kernels autograd
    # cannot see): differentiated as it is, it would give a wrong number, not an error.
    x, weight, bias, scale, shift = inputs(channels_last=channels_last, film=film)
    fused, differentiable = as_checkable(x, weight, bias, scale, shift, silu=True)
    assert torch.autograd.gradgradcheck(fused, differentiable)
    for actual, expected in zip(penalty_gradients(group_norm_activation, x, 3, weight, bias, scale, shift, differentiable),
                                penalty_gradients(unfused, x, 3, weight, bias, scale, shift, differentiable)):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_groups_from_one_to_one_per_channel_match_group_norm(groups):
    x, weight, bias, scale, shift = inputs(channels=8, dtype=torch.float32)
    grad = torch.randn(x.shape)
    expected = unfused(x, groups, weight, bias, 1e-5, scale, shift, silu=True)
    actual = group_norm_activation(x, groups, weight, bias, 1e-5, scale, shift, silu=True)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, (x, weight, bias, scale, shift), grad),
                    torch.autograd.grad(expected, (x, weight, bias, scale, shift), grad)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_output_keeps_the_layout_and_a_gradient_in_another_layout_is_read_as_it_is():
    x, weight, bias, scale, shift = inputs(batch=2, channels=4, height=4, width=4, dtype=torch.float32, channels_last=True)
    out = group_norm_activation(x, 2, weight, bias, 1e-5, scale, shift, silu=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # a gradient whose height and width do not merge into one stride (a transposed view)
    grad = torch.randn(2, 4, 4, 4).transpose(2, 3)
    (dx,) = torch.autograd.grad(out, x, grad)
    expected = unfused(x, 2, weight, bias, 1e-5, scale, shift, silu=True)
    (expected_dx,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-4, atol=1e-5)


def test_statistics_keep_their_precision_on_activations_with_a_large_mean():
    # E[x^2] - E[x]^2 in float32 would lose the variance (a spread of 1e-2 on a mean of 1e3)
    # entirely, as would x * a + b with the mean folded into b. What is left is float32's
    # rounding of x - mean, which PyTorch's own group norm has as well.
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16) * 1e-2 + 1e3
    reference = F.group_norm(x.double(), 4, eps=1e-9)
    error = (group_norm_activation(x, 4, None, None, 1e-9).double() - reference).abs().max()
    pytorch_error = (F.group_norm(x, 4, eps=1e-9).double() - reference).abs().max()
    assert error < 1e-2 and error <= 1.5 * pytorch_error, (error, pytorch_error)


def test_bf16_activations_stay_bf16_and_match_the_unfused_norm_under_autocast():
    torch.manual_seed(0)
    plain, fused = GroupNorm(4, 16), GroupNorm(4, 16)
    fused.fused = True
    x = torch.randn(2, 16, 8, 8).to(torch.bfloat16).requires_grad_()
    scale, shift = torch.randn(2, 16, 1, 1, dtype=torch.bfloat16), torch.randn(2, 16, 1, 1, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = plain(x, scale, shift, silu=True), fused(x, scale, shift, silu=True)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-6, atol=2**-6)
    grad = torch.randn(expected.shape, dtype=torch.bfloat16)
    (expected_dx,), (actual_dx,) = torch.autograd.grad(expected, x, grad), torch.autograd.grad(actual, x, grad)
    assert actual_dx.dtype == torch.bfloat16
    torch.testing.assert_close(actual_dx.float(), expected_dx.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_a_fused_instance_norm_equals_pytorchs_and_keeps_the_layout(channels_last):
    torch.manual_seed(0)
    plain, fused = InstanceNorm(16), InstanceNorm(16)
    fused.fused = True
    assert list(fused.state_dict()) == list(torch.nn.InstanceNorm2d(16).state_dict()) == []
    x = torch.randn(3, 16, 8, 6, dtype=torch.float64) * 3 + 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn_like(x)  # in x's layout, as the next convolution's backward pass hands it over
    expected, actual = plain(x), fused(x)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    (expected_dx,), (actual_dx,) = torch.autograd.grad(expected, x, grad), torch.autograd.grad(actual, x, grad)
    torch.testing.assert_close(actual_dx, expected_dx, rtol=1e-10, atol=1e-10)
    if channels_last:  # PyTorch's returns NCHW whatever the input's layout: what fusing it avoids
        assert not expected.is_contiguous(memory_format=torch.channels_last)
    assert actual.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert actual_dx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize(("shape", "groups", "film", "message"), [
    ((2, 8, 16), 2, False, r"takes a 4-D tensor, got shape \(2, 8, 16\)"),
    ((2, 6, 4, 4), 4, False, "6 channels do not split into 4 groups"),
    ((2, 8, 4, 4), 2, True, "takes scale and shift together"),
])
def test_bad_inputs_are_refused_with_the_reason(shape, groups, film, message):
    x = torch.randn(shape)
    scale = torch.randn(2, 8) if film else None
    with pytest.raises(ValueError, match=message):
        group_norm_activation(x, groups, None, None, 1e-5, scale=scale, shift=None)


def test_triton_kernels_match_the_pytorch_passes_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPOSITORY), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-m", "support.triton_interpreter_check"], cwd=TESTS, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "triton kernels match: 60 cases" in result.stdout


def test_triton_kernels_compile_for_an_h100_with_vectorised_loads_in_both_layouts():
    # Compiled ahead of time for sm_90 (no GPU needed): what the interpreter accepts may still
    # fail to compile. The arguments are described as a launch at ATME's 256 px level passes
    # them: 16-byte aligned pointers and sizes, the layout's unit stride a constant. 128-bit
    # loads show that the tiles read along the contiguous dimension of either layout.
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter replaces compiled kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from components.networks import group_norm_triton

    activations = {"x_ptr", "grad_ptr", "out_ptr", "dx_ptr"}
    block_positions, block_channels, chunk, _ = group_norm_triton._reduction_tiling(torch.empty(32, 64, 256, 256))
    for kernel in (group_norm_triton._moments_kernel, group_norm_triton._affine_activation_kernel,
                   group_norm_triton._gradient_sums_kernel, group_norm_triton._input_gradient_kernel):
        for dtype in ("bf16", "fp32"):
            for unit_stride in ("stride_p", "stride_c"):  # NCHW, channels_last
                names = kernel.arg_names
                signature = {name: (f"*{dtype}" if name in activations else "*fp32") if name.endswith("_ptr")
                             else "constexpr" if name.isupper() or name.endswith(unit_stride) else "i32" for name in names}
                constants = {"BLOCK_P": block_positions, "BLOCK_C": block_channels, "CHUNK": chunk, "SILU": True}
                constants = {name: value for name, value in constants.items() if name in names}
                constants |= {name: 1 for name in names if name.endswith(unit_stride)}
                aligned = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(names)
                           if signature[name] != "constexpr" and name not in ("programs", "tiles")}
                compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned),
                                          target=GPUTarget("cuda", 90, 32), options=group_norm_triton.LAUNCH_OPTIONS)
                assert "ld.global.v4" in compiled.asm["ptx"], (kernel.fn.__name__, dtype, unit_stride)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_kernels_match_the_pytorch_passes_on_cuda(dtype, channels_last):
    from components.networks import group_norm_triton

    torch.manual_seed(0)
    x = (torch.randn(4, 96, 32, 32, device="cuda") * 2 + 1).to(dtype)
    grad = torch.randn(x.shape, device="cuda").to(dtype)
    if channels_last:
        x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    a, b, center, p, q, r = (torch.randn(4, 96, device="cuda") for _ in range(6))
    for actual, expected in zip(group_norm_triton.channel_moments(x), fused_group_norm.channel_moments(x)):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-2)
    for actual, expected in zip(group_norm_triton.gradient_sums(x, grad, a, b, center, True),
                                fused_group_norm.gradient_sums(x, grad, a, b, center, True)):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-2)
    tolerance = {"rtol": 2**-7, "atol": 2**-7} if dtype == torch.bfloat16 else {}
    out = group_norm_triton.affine_activation(x, a, b, center, True)
    assert out.stride() == x.stride()
    torch.testing.assert_close(out, fused_group_norm.affine_activation(x, a, b, center, True), **tolerance)
    torch.testing.assert_close(group_norm_triton.input_gradient(x, grad, a, b, center, p, q, r, True),
                               fused_group_norm.input_gradient(x, grad, a, b, center, p, q, r, True), **tolerance)


@pytest.mark.cuda
@pytest.mark.parametrize(("dtype", "channels_last"), [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32_nchw", "bf16_channels_last"])
def test_a_fused_instance_norm_equals_pytorchs_at_the_pix2pix_unet_sizes_on_cuda(dtype, channels_last):
    # Instance norms of pix2pix's 256 px U-Net (ngf 64), one group per channel: the largest
    # norm, whose reductions run over several programs, and the two smallest, whose tiles are
    # cut to 16 and 4 positions. Each distinct tiling is a Triton compilation of its own, hence
    # three sizes and two of the four dtype x layout pairs (the kernels in all four: the test above).
    tolerance = {"rtol": 2**-6, "atol": 2**-6} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.manual_seed(0)
    for channels, side in ((64, 128), (512, 4), (512, 2)):
        x = (torch.randn(2, channels, side, side, device="cuda") * 2 + 1).to(dtype)
        grad = torch.randn(x.shape, device="cuda").to(dtype)
        if channels_last:
            x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
        x.requires_grad_()
        fused, plain = InstanceNorm(channels), torch.nn.InstanceNorm2d(channels)
        fused.fused = True
        actual = fused(x)
        assert actual.dtype == dtype and actual.stride() == x.stride(), (channels, side)
        (actual_dx,) = torch.autograd.grad(actual, x, grad)
        reference = x.detach().float().requires_grad_()  # PyTorch's in float32: the precision the fused one keeps
        expected = plain(reference)
        (expected_dx,) = torch.autograd.grad(expected, reference, grad.float())
        torch.testing.assert_close(actual.float(), expected, **tolerance, msg=f"{channels} x {side}^2")
        torch.testing.assert_close(actual_dx.float(), expected_dx, **tolerance, msg=f"{channels} x {side}^2 dx")


@pytest.mark.cuda
def test_a_second_order_gradient_through_the_triton_forward_equals_the_unfused_ops_on_cuda():
    # The forward pass runs Triton's kernels on CUDA and the gradient to be differentiated once
    # more, PyTorch's ops: R1 through a fused discriminator, channels_last as a switch gives it.
    torch.manual_seed(0)
    x = (torch.randn(2, 64, 16, 16, device="cuda") * 2 + 1).to(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.randn(64, device="cuda", requires_grad=True), torch.randn(64, device="cuda", requires_grad=True)
    for actual, expected in zip(penalty_gradients(group_norm_activation, x, 8, weight, bias, None, None, (x, weight, bias)),
                                penalty_gradients(unfused, x, 8, weight, bias, None, None, (x, weight, bias))):
        torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)
