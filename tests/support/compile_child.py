"""A fresh process that compiles a network with Inductor, as a training worker does, keeping the
compiled code in a compile cache: `python -m support.compile_child NETWORK LOCATION OUT_JSON`.

NETWORK: `attention` (the attention blocks of a small DDPM U-Net, at three sizes, each given
an input of its size) or `w` (ATME's W, one region: the cheapest real compilation).
LOCATION: the cache folder, or `-` for none. Writes what it saw to OUT_JSON: dynamo's,
AOTAutograd's and Inductor's counters, what the cache loaded and saved, the output.
The caller gives each process its own TORCHINDUCTOR_CACHE_DIR, as a fresh machine has.
"""

import json
import logging
import sys

import torch
from torch._dynamo.utils import counters

from components.networks.atme_w import ATMEW
from components.networks.ddpm_unet import DDPMUNet, FullAttention, LinearAttention
from components.training.compile_cache import CompileCache, configuration_key
from components.training.performance import Switches, apply_switches, configure_backends

COMPILED = Switches(autocast_dtype=None, channels_last=False, fused_adam=False, tf32=False, cudnn_benchmark=False,
                    compile=True, cuda_graphs=False, sdpa=True, activation_checkpointing=False, fused_norm=False)


def small_w() -> ATMEW:
    return ATMEW(16, channels=(4, 4, 4), groups=2)


def cache_key(network: torch.nn.Module) -> str:
    return configuration_key({"G": network}, COMPILED.summary(), 2, 16, torch.device("cpu"))


def attention_blocks_and_inputs() -> tuple[torch.nn.Module, list[tuple[torch.nn.Module, torch.Tensor]]]:
    """A small DDPM U-Net, and its attention blocks (at three sizes, and the full attention) each
    with an input of the size it sees in the network."""
    torch.manual_seed(0)
    network = DDPMUNet(3, 3, width=8, channel_multipliers=(1, 2, 2), attention_levels=(0, 1, 2),
                       blocks_per_level=1, groups=4, attention_heads=2, attention_head_dim=8)
    shapes: dict[torch.nn.Module, torch.Size] = {}

    def record_shape(module: torch.nn.Module, args: tuple) -> None:
        shapes[module] = args[0].shape

    hooks = [module.register_forward_pre_hook(record_shape)
             for module in network.modules() if isinstance(module, LinearAttention | FullAttention)]
    with torch.no_grad():
        network(torch.randn(2, 3, 16, 16), torch.rand(2))
    for hook in hooks:
        hook.remove()
    return network, [(module, torch.randn(shape)) for module, shape in shapes.items()]


def main() -> None:
    name, location, out = sys.argv[1:4]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    if name == "attention":
        # Only the attention blocks run: they are what dynamic shapes broke, and the U-Net's
        # other blocks would add a minute of C++ compilation.
        network, calls = attention_blocks_and_inputs()
    else:
        network = small_w()
        calls = [(network, torch.randn(2, 1, 4, 4))]
    configure_backends(COMPILED)
    apply_switches(network, COMPILED)
    cache = None
    if location != "-":
        cache = CompileCache(location, cache_key(network))
    loaded = cache.load() if cache is not None else 0
    outputs = [block(x) for block, x in calls]
    sum(output.square().mean() for output in outputs).backward()
    saved = cache.save() if cache is not None else False
    result = {
        "frames": dict(counters["frames"]), "aot_autograd": dict(counters["aot_autograd"]),
        "inductor": {key: value for key, value in counters["inductor"].items() if key.startswith("fxgraph_cache")},
        "loaded": loaded, "saved": saved, "uri": cache.uri if cache is not None else None,
        "output": torch.cat([output.detach().flatten() for output in outputs]).tolist(),
    }
    with open(out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
