"""The DDPM U-Net's optimised blocks compute what the straightforward formulations compute (fp32).

The references below are the textbook forms (as in lucidrains' denoising-diffusion U-Net that
ATME uses): einsum over (batch, heads, dim, positions) tensors, softmax in float32.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from components.networks.ddpm_unet import FullAttention, LinearAttention, ResBlock
from components.networks.norms import GroupNorm
from components.networks.pix2pix import UNetBlock, UNetGenerator
from support.synthetic_pairs import single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """b (3 h d) x y -> three b h d (x y)"""
    batch, _, height, width = qkv.shape
    return tuple(part.reshape(batch, heads, -1, height * width) for part in qkv.chunk(3, dim=1))


def reference_linear_attention(block: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = split_heads(block.qkv(block.norm(x)), block.heads)
    q = q.softmax(dim=-2) * block.head_dim**-0.5
    k = k.softmax(dim=-1)
    context = torch.einsum("bhdn,bhen->bhde", k, v)
    out = torch.einsum("bhde,bhdn->bhen", context, q)
    return x + block.out(out.reshape(x.shape[0], -1, *x.shape[2:]))


def reference_full_attention(block: FullAttention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = split_heads(block.qkv(block.norm(x)), block.heads)
    weights = (torch.einsum("bhdi,bhdj->bhij", q, k) * block.head_dim**-0.5).softmax(dim=-1)
    out = torch.einsum("bhij,bhdj->bhid", weights, v)
    return x + block.out(out.transpose(2, 3).reshape(x.shape[0], -1, *x.shape[2:]))


# On a GPU (bench/gpu_check.py runs the cuda tests) the same checks meet cuDNN's and cuBLAS's
# layout rules instead of the CPU's.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def linear_attention_and_input(device: str, channels_last: bool) -> tuple[LinearAttention, torch.Tensor]:
    torch.manual_seed(0)
    block = LinearAttention(16, heads=2, head_dim=8, groups=4).to(device)
    x = torch.randn(2, 16, 12, 10, device=device)
    if channels_last:
        return block.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return block, x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_linear_attention_equals_the_einsum_formulation(channels_last, device):
    switched, x = linear_attention_and_input(device, channels_last)
    block = copy.deepcopy(switched).to(memory_format=torch.contiguous_format)
    x_expected, x_switched = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected, out = reference_linear_attention(block, x_expected), switched(x_switched)
        grad = torch.randn_like(out)
        expected.backward(grad)
        out.backward(grad)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x_switched.grad, x_expected.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(switched.qkv.weight.grad, block.qkv.weight.grad, atol=1e-4, rtol=1e-4)


def full_resolution_copies(block: nn.Module, x: torch.Tensor, at_least: int) -> list[str]:
    """The layout copies (clones) of tensors of at least `at_least` elements that block makes in
    one forward and backward pass, nested ones included (a softmax's own `.contiguous()`), each
    named by its callers. Left out: the convolutions' own, which depend on the backend (cuDNN,
    oneDNN or PyTorch's slow path), and a convolution's copy of its bias into its output."""
    grad = torch.randn_like(x)
    x = x.detach().requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiler:
        block(x).backward(grad)
    copies = []
    for event in profiler.events():
        sizes = [torch.Size(shape).numel() for shape in event.input_shapes if shape]
        parent = event.cpu_parent
        if event.name == "aten::copy_" and parent is not None and parent.name in ("aten::clone", "aten::_to_copy") \
                and max(sizes, default=0) >= at_least:
            callers = []
            while parent is not None and len(callers) < 3:
                callers.append(parent.name)
                parent = parent.cpu_parent
            if not any("conv" in name for name in callers):
                copies.append(" < ".join(callers))
    return copies


def nhwc_with_fused_norms(block: LinearAttention) -> None:
    """The block as NHWC runs: with the fused norm (PyTorch's own group norm copies NHWC tensors on CUDA)."""
    for norm in (block.norm, block.out[1]):
        norm.fused = True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_linear_attention_copies_one_full_resolution_tensor(channels_last, device):
    # At 256 px each copy is a pass over 0.5 GB at batch 32, each way. In channels_last the
    # channel-major products made 5 a block here, forward and backward (q and k for their
    # softmaxes, v for its matmul, and gradients), besides what the convolutions then copied
    # back to NHWC. What stays: in NCHW, v's gradient, which a batched matmul hands back
    # transposed; in NHWC, k made channel-major for its softmax over the positions.
    block, x = linear_attention_and_input(device, channels_last)
    if channels_last:
        nhwc_with_fused_norms(block)
    copies = full_resolution_copies(block, x, at_least=2 * 12 * 10 * block.heads * block.head_dim)
    assert len(copies) == 1, copies
    assert copies[0] == ("aten::clone < aten::contiguous" if channels_last else
                         "aten::clone < aten::reshape < ViewBackward0"), copies


class SoftmaxSpy(TorchDispatchMode):
    """Records (shape, dim, contiguous) of every softmax, forward and backward."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], int, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._softmax.default:  # (input, dim, half_to_float)
            tensor, dim = args[0], args[1]
            self.calls.append((tuple(tensor.shape), dim % tensor.dim(), tensor.is_contiguous()))
        if func is torch.ops.aten._softmax_backward_data.default:  # (grad, output, dim, input dtype)
            grad, output, dim = args[0], args[1], args[2]
            self.calls.append((tuple(grad.shape), dim % grad.dim(), grad.is_contiguous() and output.is_contiguous()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("channels_last", [False, True])
def test_linear_attention_softmaxes_are_over_a_last_or_short_dimension_of_contiguous_tensors(channels_last):
    # CUDA's softmax over a middle dimension is fast only where that dimension is short (q's
    # head dim in NCHW): over a long one (k's positions as a middle dimension of an NHWC view)
    # it gives each channel one thread that walks all the positions. A strided input is copied
    # inside the softmax first.
    block, x = linear_attention_and_input("cpu", channels_last)
    if channels_last:
        nhwc_with_fused_norms(block)
    spy = SoftmaxSpy()
    with spy:
        block(x.requires_grad_(True)).sum().backward()
    assert len(spy.calls) == 4, spy.calls  # q and k, forward and backward
    for shape, dim, contiguous in spy.calls:
        assert contiguous and (dim == len(shape) - 1 or shape[dim] <= block.head_dim), spy.calls


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_full_attention_equals_the_einsum_formulation_with_and_without_sdpa(use_sdpa):
    torch.manual_seed(0)
    block = FullAttention(16, heads=2, head_dim=8, groups=4)
    block.use_sdpa = use_sdpa
    x = torch.randn(2, 16, 6, 5)
    assert torch.allclose(block(x), reference_full_attention(block, x), atol=1e-5)


def reference_res_block(block: ResBlock, x: torch.Tensor, time: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Written out: SiLU((1 + gamma(z)) GN(x) + beta(z)) -> conv -> SiLU((1 + scale(t)) GN + shift(t)) -> conv, + skip."""
    gamma, beta = block.latent_projection(latent)[:, :, None, None].chunk(2, dim=1)
    h = F.group_norm(x, block.norm1.num_groups, block.norm1.weight, block.norm1.bias, block.norm1.eps)
    h = block.conv1(F.silu(h * (1 + gamma) + beta))
    scale, shift = block.time_projection(time)[:, :, None, None].chunk(2, dim=1)
    h = F.group_norm(h, block.norm2.num_groups, block.norm2.weight, block.norm2.bias, block.norm2.eps)
    return block.conv2(F.silu(h * (1 + scale) + shift)) + block.skip(x)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused_norm"])
def test_res_block_equals_the_written_out_formulation(fused):
    # which projection feeds which norm, scale against shift, where the SiLUs are: the norm call
    # carries all three, in its plain path and in the fused operation
    torch.manual_seed(0)
    block = ResBlock(8, 16, embed_dim=12, groups=4, latent_dim=6, dropout=0.0)
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight.normal_()
            norm.bias.normal_()
            norm.fused = fused
    x, time, latent = torch.randn(2, 8, 6, 6), torch.randn(2, 12), torch.randn(2, 6)
    torch.testing.assert_close(block(x, time, latent), reference_res_block(block, x, time, latent))


def test_group_norm_is_nn_group_norm_in_float32_and_keeps_bf16_activations_bf16():
    torch.manual_seed(0)
    ours, plain = GroupNorm(4, 16), nn.GroupNorm(4, 16)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    plain.load_state_dict(ours.state_dict())
    # a large offset: statistics summed in bf16 over these positions would lose the variance
    x = torch.randn(2, 16, 64, 64) * 0.01 + 3.0
    assert torch.equal(ours(x), plain(x))
    low = x.bfloat16().requires_grad_(True)
    saved: list[torch.dtype] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() >= low.numel():
            saved.append(tensor.dtype)
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ours(low)
    assert out.dtype == torch.bfloat16
    # float32 statistics: within bf16 rounding of the float32 norm of the same input
    reference = F.group_norm(low.detach().float(), 4, ours.weight, ours.bias, ours.eps)
    assert (out.float() - reference).abs().max() <= 0.02 * reference.abs().max()
    # the backward pass keeps the bf16 input, not a float32 copy
    assert saved == [torch.bfloat16]
    out.float().sum().backward()
    assert low.grad.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.float32


def test_a_pix2pix_generator_saved_with_plain_sequential_levels_loads():
    # checkpoints written before the levels became UNetBlocks (plain nn.Sequential) still load
    torch.manual_seed(0)
    generator = UNetGenerator(3, 3, 32, ngf=4)
    old_style = UNetGenerator(3, 3, 32, ngf=4)
    for levels in (old_style.downs, old_style.ups):
        for number, level in enumerate(levels):
            if isinstance(level, UNetBlock):
                levels[number] = nn.Sequential(*level)
    assert not any(isinstance(module, UNetBlock) for module in old_style.modules())
    generator.load_state_dict(old_style.state_dict())
    generator.eval(), old_style.eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(generator(x), old_style(x))


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_linear_attention_under_cuda_bf16_stores_q_and_k_in_bf16(channels_last):
    # CUDA's autocast runs softmax in float32 and returns float32: at full resolution the
    # backward pass would keep float32 copies of q and k. (The CPU's autocast keeps bf16.)
    block = LinearAttention(16, heads=2, head_dim=8, groups=4).cuda()
    x = torch.randn(2, 16, 32, 32, device="cuda").bfloat16()
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    with torch.autocast("cuda", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    full_resolution = 2 * 32 * 32 * 2 * 8  # batch x positions x heads x dim
    large_float32 = [numel for dtype, numel in saved if dtype == torch.float32 and numel >= full_resolution]
    # nothing at this size is kept in float32 (the group norms keep their bf16 inputs too)
    assert not large_float32, large_float32
