"""The speed and memory switches of params/train.yaml `performance:`, resolved and applied to networks.

`resolve_switches` turns the params (true, false or auto) into what runs on this device;
`apply_switches` applies them to one network before the caller wraps it (DDP):

- cudnn_benchmark: cuDNN times the convolution algorithms it has for each new shape on
  its first use and keeps the fastest, instead of its heuristic's pick; the shapes of a
  training run are fixed, so the search is paid once, in the first step.
- channels_last: NHWC weights (the batch is converted by the loop), what cuDNN's bf16
  convolutions prefer.
- sdpa: the DDPM U-Net's full attention through F.scaled_dot_product_attention (off: the
  same attention written out).
- compile: regional torch.compile. A network made of repeated blocks (the DDPM U-Net's
  ResBlocks and attention blocks, the pix2pix U-Net's UNetBlocks) has each block compiled
  in place, not the whole network: blocks of one class and shape share one compiled graph,
  and Inductor fuses each block's norm, activation, FiLM and residual into a few kernels.
  Graphs are static-shape (`dynamic=False`): with dynamo's automatic dynamic shapes, the
  attention blocks' graphs over symbolic sizes failed in Inductor and ran eagerly, with a
  traceback on the console (2 of 14 regions of a small U-Net on PyTorch 2.13), and a static
  graph's kernels are specialised to their sizes. Compiling is still minutes for ATME's U-Net
  at 256 px (about 160 s on an H200, forward and backward of every block shape), hence off by
  default; `compile_cache` keeps the compiled code for the next run (compile_cache.py).
  ATME's W, small and without repeated blocks, is compiled whole. PatchGAN is not compiled:
  the R1 penalty (the D-reg phase) differentiates twice through D, which compiled code does
  not support, so that phase runs every network eagerly (`eager()` in methods/base.py);
  compiling D for its other phases is not measured on a GPU yet. A block that fails to
  compile runs eagerly, with dynamo's warning.
- cuda_graphs: the compiled regions run as CUDA graphs (torch.compile's "reduce-overhead"
  mode, CUDA graph trees), which removes the kernel-launch cost. The whole training step is
  not captured as one graph: it re-seeds the RNG from the host every step, sets gradients to
  None, reads ATME's memory with data-dependent indices and synchronises with the host for
  the divergence check, none of which a static graph replays.
- activation_checkpointing: the repeated blocks keep only their inputs for the backward pass
  and recompute the rest (torch.utils.checkpoint, non-reentrant): less memory for about
  one more forward pass of those blocks.
- fused_norm: the DDPM U-Net's group norms, with the FiLM and SiLU that follow them, run as
  one operation with its own backward pass (components/networks/fused_group_norm.py; Triton
  kernels on CUDA, in any layout, channels_last included); the pix2pix U-Net's instance norms
  run as the same operation (one group per channel), which keeps channels_last where PyTorch's
  instance norm returns NCHW; PatchGAN's too (R1's second-order gradient through them runs as
  PyTorch ops, in the D-reg phase only). For eager mode: with compile, Inductor fuses those
  ops itself and the switch is off.

Compiling and checkpointing happen in place (`module.compile()` and a bound `forward`), so
state_dict keys, `unwrap`, DDP and deep copies (DDGAN's EMA) see the plain network.
"""

import logging
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from components.config.train import PerformanceParams
from components.networks.atme_w import ATMEW
from components.networks.ddpm_unet import DDPMUNet, FullAttention, LinearAttention, ResBlock
from components.networks.fused_group_norm import triton_unavailable_reason
from components.networks.norms import GroupNorm, InstanceNorm
from components.networks.pix2pix import UNetBlock, UNetGenerator

logger = logging.getLogger(__name__)

# What `auto` turns on with a CUDA device (on the CPU `auto` is off, except sdpa). Set from
# the GPU check's on/off measurements (bench/gpu_check.py, docs/benchmarks.md): a switch is on
# by default only where it was measured to win on every method.
AUTO_CUDA_AUTOCAST_BF16 = True
AUTO_CUDA_CHANNELS_LAST = False
AUTO_CUDA_FUSED_ADAM = True
AUTO_CUDA_CUDNN_BENCHMARK = False
AUTO_CUDA_COMPILE = False
AUTO_CUDA_CUDA_GRAPHS = False
AUTO_CUDA_ACTIVATION_CHECKPOINTING = False
AUTO_CUDA_FUSED_NORM = False
AUTO_SDPA = True

# Distinct graphs dynamo may keep per code object. Every compiled block shares
# nn.Module._call_impl, so the default (8) would be reached by the block classes and sizes of
# one U-Net, after which blocks silently run eagerly.
RECOMPILE_LIMIT = 64

# The group norm and the linear attention's softmax leave autocast for one op (float32
# statistics without float32 activations: components/networks/norms.py, ddpm_unet.py). Dynamo
# records the context as calls to these two functions, which AOTAutograd's cache does not know
# to be safe: every graph with a group norm bypassed it, so each start traced every block's
# forward and backward again, even with Inductor's code cached (ATME's U-Net at 32 px on the
# CPU, Inductor folder kept: first step 13.8 s instead of 5.1). They are safe: their
# arguments (device type, dtype, enabled) are constants of the graph, which is the cache key,
# and the key also holds the autocast state around it. Keyed by the torch version, as
# PyTorch's own cacheable functions are.
AUTOCAST_CONTEXT_FUNCTIONS = ("torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast")


@dataclass(frozen=True)
class Switches:
    """What runs on this device, every `auto` resolved."""

    autocast_dtype: torch.dtype | None
    channels_last: bool
    fused_adam: bool
    tf32: bool
    cudnn_benchmark: bool
    compile: bool
    cuda_graphs: bool
    sdpa: bool
    activation_checkpointing: bool
    fused_norm: bool

    def summary(self) -> dict[str, bool | str]:
        """Plain values for logs and reports."""
        return {
            "autocast": "bf16" if self.autocast_dtype == torch.bfloat16 else "none",
            "channels_last": self.channels_last,
            "fused_adam": self.fused_adam,
            "tf32": self.tf32,
            "cudnn_benchmark": self.cudnn_benchmark,
            "compile": self.compile,
            "cuda_graphs": self.cuda_graphs,
            "sdpa": self.sdpa,
            "activation_checkpointing": self.activation_checkpointing,
            "fused_norm": self.fused_norm,
        }


def _resolve(value: bool | str, auto: bool) -> bool:
    return auto if value == "auto" else bool(value)


def resolve_switches(params: PerformanceParams, device: torch.device) -> Switches:
    cuda = torch.device(device).type == "cuda"
    if params.cuda_graphs is True and not cuda:
        logger.warning("performance.cuda_graphs is true but training runs on %s: CUDA graphs need a CUDA device, off", device)
    bf16 = params.autocast == "bf16" or (params.autocast == "auto" and cuda and AUTO_CUDA_AUTOCAST_BF16)
    compile_ = _resolve(params.compile, cuda and AUTO_CUDA_COMPILE)
    fused_norm = _resolve(params.fused_norm, cuda and AUTO_CUDA_FUSED_NORM)
    # On CUDA both run Triton kernels; found out here rather than at the first kernel, mid-step.
    triton_problem = triton_unavailable_reason() if cuda and (compile_ or fused_norm) else None
    if compile_ and triton_problem:
        logger.warning("performance.compile is off: %s", triton_problem)
        compile_ = False
    if fused_norm and compile_:
        if params.fused_norm is True:
            logger.info("performance.fused_norm is off: compile fuses the norms with what follows them itself")
        fused_norm = False
    if fused_norm and triton_problem:
        logger.warning("performance.fused_norm is off: its CUDA kernels run on Triton, and %s", triton_problem)
        fused_norm = False
    switches = Switches(
        autocast_dtype=torch.bfloat16 if bf16 else None,
        channels_last=_resolve(params.channels_last, cuda and AUTO_CUDA_CHANNELS_LAST),
        fused_adam=_resolve(params.fused_adam, cuda and AUTO_CUDA_FUSED_ADAM),
        tf32=cuda and params.tf32,
        cudnn_benchmark=cuda and _resolve(params.cudnn_benchmark, AUTO_CUDA_CUDNN_BENCHMARK),
        compile=compile_,
        # CUDA graphs are a mode of the compiled regions: without compile there is nothing to capture.
        cuda_graphs=cuda and compile_ and _resolve(params.cuda_graphs, AUTO_CUDA_CUDA_GRAPHS),
        sdpa=_resolve(params.sdpa, AUTO_SDPA),
        activation_checkpointing=_resolve(params.activation_checkpointing, cuda and AUTO_CUDA_ACTIVATION_CHECKPOINTING),
        fused_norm=fused_norm,
    )
    logger.info("performance switches on %s: %s", device, ", ".join(f"{k}={v}" for k, v in switches.summary().items()))
    if switches.compile:
        # The first step is silent while Inductor compiles every block shape, forward and backward.
        logger.info("compile: the blocks compile during the first training step (about 3 minutes for ATME's U-Net "
                    "at 256 px on an H200; performance.compile_cache keeps the compiled code for the next run); "
                    "the step progress starts after it")
    return switches


def configure_backends(switches: Switches) -> None:
    """Process-wide settings the switches need (TF32 matmuls and convolutions, cuDNN's algorithm
    search, dynamo's limits, what AOTAutograd's cache may keep)."""
    # Set either way: the switches of the last session made in this process hold (a benchmark
    # measuring fp32 after a TF32 session in the same process measures fp32).
    torch.backends.cuda.matmul.allow_tf32 = switches.tf32
    torch.backends.cudnn.allow_tf32 = switches.tf32
    torch.backends.cudnn.benchmark = switches.cudnn_benchmark
    if switches.compile:
        torch._dynamo.config.suppress_errors = True
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._inductor.config.unsafe_marked_cacheable_functions = {
            **torch._inductor.config.unsafe_marked_cacheable_functions,
            **dict.fromkeys(AUTOCAST_CONTEXT_FUNCTIONS, torch.__version__),
        }


def repeated_blocks(network: nn.Module) -> list[nn.Module]:
    """The blocks a network repeats (the units of regional compile and of checkpointing); none
    for networks without a repeated structure."""
    if isinstance(network, DDPMUNet):
        return [module for module in network.modules() if isinstance(module, ResBlock | LinearAttention | FullAttention)]
    if isinstance(network, UNetGenerator):
        return [module for module in network.modules() if isinstance(module, UNetBlock)]
    return []


def compile_regions(network: nn.Module) -> list[nn.Module]:
    """What `compile` compiles in a network (see the module doc for why PatchGAN is left out)."""
    if isinstance(network, ATMEW):
        return [network]
    return repeated_blocks(network)


def _checkpointed_forward(block: nn.Module, *inputs: torch.Tensor | None) -> torch.Tensor:
    forward = type(block).forward
    if not torch.is_grad_enabled():
        return forward(block, *inputs)  # sampling: nothing to save, nothing to recompute
    return checkpoint(forward, block, *inputs, use_reentrant=False)


def apply_switches(network: nn.Module, switches: Switches) -> nn.Module:
    """Memory format, attention kernel, checkpointing and regional compile, in place; returns `network`.

    Call after moving the network to its device and before wrapping it in DDP.
    """
    if switches.channels_last:
        network = network.to(memory_format=torch.channels_last)
    for module in network.modules():
        if isinstance(module, FullAttention):
            module.use_sdpa = switches.sdpa
        if isinstance(module, GroupNorm | InstanceNorm):
            module.fused = switches.fused_norm
    if switches.activation_checkpointing:
        for block in repeated_blocks(network):
            # bound to the block, so a deep copy (an EMA of G) rebinds it to the copy
            block.forward = types.MethodType(_checkpointed_forward, block)
    if switches.compile:
        mode = "reduce-overhead" if switches.cuda_graphs else None
        for region in compile_regions(network):
            region.compile(mode=mode, dynamic=False)
    return network
