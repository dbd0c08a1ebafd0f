"""The performance switches: what `auto` resolves to, how each switch changes a network, and
that a switched network computes what the plain one does. The `cuda` tests run on a GPU
(bench/gpu_check.py): Inductor's compiled blocks, CUDA graphs and bf16 against eager fp32.
"""

import copy
import dataclasses
import functools
import logging
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml

from components.config.loading import ParamsError, load_params
from components.config.model import ModelParams
from components.config.train import PerformanceParams, TrainParams
from components.methods.base import unwrap
from components.methods.losses import r1_penalty
from components.networks import norms
from components.networks.atme_w import ATMEW
from components.networks.ddpm_unet import DDPMUNet, FullAttention, LinearAttention, ResBlock
from components.networks.fused_group_norm import triton_unavailable_reason
from components.networks.norms import GroupNorm, InstanceNorm
from components.networks.pix2pix import PatchGAN, UNetGenerator
from components.training import performance
from components.training.loop import TrainingSession
from components.training.performance import Switches, apply_switches, compile_regions, resolve_switches
from support.synthetic_pairs import SyntheticPairs, single_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
PLAIN = Switches(autocast_dtype=None, channels_last=False, fused_adam=False, tf32=False, cudnn_benchmark=False,
                 compile=False, cuda_graphs=False, sdpa=True, activation_checkpointing=False, fused_norm=False)


def shipped(name: str) -> dict:
    return yaml.safe_load((Path(__file__).resolve().parents[2] / "params" / name).read_text())


LOSS = {"gan_loss": "vanilla", "label_smoothing": 0.0, "lambda_l1": 100.0, "r1_gamma": 0.0, "r1_interval": 16}
SMALL_UNET = {"width": 16, "channel_multipliers": [1, 2, 2], "attention_levels": [0, 1, 2], "blocks_per_level": 1,
              "groups": 4, "attention_heads": 2, "attention_head_dim": 8, "dropout": 0.0}
SMALL_METHODS = {
    "pix2pix": {**shipped("model.yaml")["method"], "generator": {**shipped("model.yaml")["method"]["generator"], "ngf": 16}},
    "atme": {"name": "atme", "generator": SMALL_UNET, "discriminator": {"ndf": 16, "n_layers": 3, "norm": "batch"},
             "w": {"channels": [8, 8, 8], "groups": 4}, "loss": LOSS, "test_map_logit": 0.0, "diffusion_gan": None},
    "ddgan": {"name": "ddgan", "generator": {**SMALL_UNET, "attention_levels": [2]},
              "discriminator": {"ndf": 16, "n_layers": 3, "norm": "none"},
              "loss": {**LOSS, "lambda_l1": 0.0, "r1_gamma": 0.05, "r1_interval": 2}, "num_steps": 2, "beta_min": 0.1,
              "beta_max": 20.0, "nz": 8, "ema_decay": 0.999, "guidance": None},
}


def session_for(method: str, switches: dict, device: torch.device, data: SyntheticPairs,
                method_overrides: dict | None = None) -> TrainingSession:
    """A small network of `method` at 32 px with the shipped params and these performance switches
    (`method_overrides`: keys of its `method:` block replaced)."""
    model = ModelParams.model_validate({**shipped("model.yaml"), "image_size": 32, "load_size": 36,
                                        "method": {**SMALL_METHODS[method], **(method_overrides or {})}})
    train = shipped("train.yaml")
    train["performance"].update(switches)
    return TrainingSession(model, TrainParams.model_validate(train), len(data), device)


def performance_params(**overrides: object) -> PerformanceParams:
    return PerformanceParams.model_validate({**shipped("train.yaml")["performance"], **overrides})


def small_unet(**overrides: object) -> DDPMUNet:
    settings = {"width": 8, "channel_multipliers": (1, 2), "attention_levels": (0, 1), "blocks_per_level": 1, "groups": 4,
                "attention_heads": 2, "attention_head_dim": 8, **overrides}
    return DDPMUNet(3, 3, **settings)


def saved_bytes(run) -> int:
    """Bytes autograd keeps for the backward pass while `run()` builds its graph."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return total


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's eager backend: the regional wiring runs for real (dynamo traces
    every block) without Inductor's C++ build; Inductor itself is checked by the cuda tests."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    yield
    torch._dynamo.reset()


def test_auto_follows_the_measured_defaults_on_cuda_and_is_off_on_the_cpu():
    auto = performance_params(autocast="auto", channels_last="auto", fused_adam="auto", cudnn_benchmark="auto",
                              compile="auto", cuda_graphs="auto", sdpa="auto", activation_checkpointing="auto",
                              fused_norm="auto")
    on_cpu = resolve_switches(auto, CPU)
    assert on_cpu == Switches(None, False, False, False, False, False, False, True, False, False)
    on_cuda = resolve_switches(auto, CUDA)
    assert on_cuda.channels_last == performance.AUTO_CUDA_CHANNELS_LAST
    assert on_cuda.cudnn_benchmark == performance.AUTO_CUDA_CUDNN_BENCHMARK
    assert on_cuda.compile == performance.AUTO_CUDA_COMPILE
    assert on_cuda.fused_adam == performance.AUTO_CUDA_FUSED_ADAM
    assert on_cuda.activation_checkpointing == performance.AUTO_CUDA_ACTIVATION_CHECKPOINTING
    assert (on_cuda.autocast_dtype == torch.bfloat16) == performance.AUTO_CUDA_AUTOCAST_BF16
    assert on_cuda.cuda_graphs == (performance.AUTO_CUDA_COMPILE and performance.AUTO_CUDA_CUDA_GRAPHS)
    assert on_cuda.fused_norm == (performance.AUTO_CUDA_FUSED_NORM and not performance.AUTO_CUDA_COMPILE
                                  and triton_unavailable_reason() is None)
    assert on_cuda.tf32


def test_explicit_switches_hold_on_the_cpu_except_cuda_graphs(caplog):
    caplog.set_level(logging.INFO, logger=performance.__name__)
    every = performance_params(autocast="bf16", channels_last=True, fused_adam=True, cudnn_benchmark=True, compile=True,
                               cuda_graphs=True, sdpa=False, activation_checkpointing=True, fused_norm=True)
    switches = resolve_switches(every, CPU)
    # TF32 and cuDNN's algorithm search are CUDA settings: off on the CPU whatever the params say;
    # the fused norm is for eager mode
    assert switches == Switches(torch.bfloat16, True, True, False, False, True, False, False, True, False)
    assert "CUDA graphs need a CUDA device" in caplog.text
    assert "the blocks compile during the first training step" in caplog.text
    assert "fused_norm is off: compile fuses the norms" in caplog.text
    assert resolve_switches(every, CUDA).cuda_graphs


def test_fused_norm_holds_without_compile_and_needs_triton_on_cuda(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=performance.__name__)
    fused = performance_params(compile=False, cuda_graphs=False, fused_norm=True)
    assert resolve_switches(fused, CPU).fused_norm  # the PyTorch passes on the CPU
    assert "fused_norm is off" not in caplog.text
    monkeypatch.setattr(performance, "triton_unavailable_reason", lambda: None)
    assert resolve_switches(fused, CUDA).fused_norm
    monkeypatch.setattr(performance, "triton_unavailable_reason", lambda: "Triton is not installed")
    assert not resolve_switches(fused, CUDA).fused_norm
    assert "fused_norm is off: its CUDA kernels run on Triton, and Triton is not installed" in caplog.text
    assert resolve_switches(fused, CPU).fused_norm


def test_compile_and_its_cuda_graphs_are_off_where_triton_cannot_build_its_cuda_module(monkeypatch, caplog):
    # torch.compile's CUDA kernels are Triton's: without a C compiler they fail at the first one.
    caplog.set_level(logging.INFO, logger=performance.__name__)
    compiled = performance_params(compile=True, cuda_graphs=True, fused_norm=True)
    monkeypatch.setattr(performance, "triton_unavailable_reason", lambda: "Triton finds no C compiler")
    switches = resolve_switches(compiled, CUDA)
    assert (switches.compile, switches.cuda_graphs, switches.fused_norm) == (False, False, False)
    assert "performance.compile is off: Triton finds no C compiler" in caplog.text
    assert ("performance.fused_norm is off: its CUDA kernels run on Triton, and Triton finds no C compiler"
            in caplog.text)
    assert resolve_switches(compiled, CPU).compile  # Inductor's CPU code is C++, not Triton: not this check


def _machine(monkeypatch, tmp_path, compiler: str | None, headers: bool) -> None:
    """PATH with only `compiler` (an executable file), no $CC, and Python headers or none."""
    bin_folder, include = tmp_path / "bin", tmp_path / "include"
    bin_folder.mkdir()
    include.mkdir()
    if compiler:
        (bin_folder / compiler).write_text("#!/bin/sh\n")
        (bin_folder / compiler).chmod(0o755)
    if headers:
        (include / "Python.h").write_text("")
    monkeypatch.setenv("PATH", str(bin_folder))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(sysconfig, "get_paths", lambda scheme=None: {"include": str(include)})


@pytest.mark.parametrize("compiler, headers, reason", [
    ("gcc", True, None),
    ("clang", True, None),
    (None, True, "no C compiler"),
    ("gcc", False, "has no Python.h"),
])
def test_triton_is_usable_with_a_c_compiler_and_the_python_headers(compiler, headers, reason, monkeypatch, tmp_path):
    pytest.importorskip("triton")
    _machine(monkeypatch, tmp_path, compiler, headers)
    found = triton_unavailable_reason()
    assert found is None if reason is None else reason in found
    if compiler is None:  # $CC names one, as Triton honours it
        monkeypatch.setenv("CC", "/opt/toolchain/bin/cc")
        assert triton_unavailable_reason() is None


def test_fused_norm_is_refused_unless_true_false_or_auto(tmp_path):
    data = shipped("train.yaml")
    data["performance"]["fused_norm"] = "yes please"
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"train\.yaml: performance\.fused_norm"):
        load_params(path, TrainParams)


@pytest.fixture
def backend_flags():
    """The process-wide flags configure_backends sets, restored afterwards. (cuBLAS's flag is no
    attribute of its module object, which monkeypatch cannot restore.)"""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cudnn_benchmark_and_tf32_follow_the_switches_of_the_last_session(backend_flags):
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False
    performance.configure_backends(dataclasses.replace(PLAIN, cudnn_benchmark=True, tf32=True))
    assert torch.backends.cudnn.benchmark
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    performance.configure_backends(PLAIN)
    assert not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_cuda_graphs_without_compile_is_refused_naming_the_file_and_key(tmp_path):
    data = shipped("train.yaml")
    data["performance"].update({"compile": False, "cuda_graphs": True})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"train\.yaml: performance.*cuda_graphs: true needs compile"):
        load_params(path, TrainParams)
    data["performance"]["compile"] = "auto"
    path.write_text(yaml.safe_dump(data))
    assert load_params(path, TrainParams).performance.cuda_graphs is True


def test_compile_takes_the_repeated_blocks_and_leaves_patchgan_alone():
    unet = small_unet()
    regions = compile_regions(unet)
    assert regions and all(isinstance(region, ResBlock | LinearAttention | FullAttention) for region in regions)
    assert sum(isinstance(region, FullAttention) for region in regions) == 1
    generator = UNetGenerator(3, 3, 32, ngf=4)
    assert compile_regions(generator) == [*generator.downs[1:], *generator.ups]  # the first is one convolution
    w = ATMEW(32, (8, 8, 8))
    assert compile_regions(w) == [w]
    assert compile_regions(PatchGAN(6, ndf=4)) == []


@pytest.mark.parametrize("build", [small_unet, lambda: UNetGenerator(3, 3, 16, ngf=4), lambda: ATMEW(16, (8, 8, 8))],
                         ids=["ddpm_unet", "pix2pix_unet", "atme_w"])
def test_every_region_is_really_compiled(eager_compile, build):
    # module.compile() of a torch container (nn.Sequential) compiles nothing: each region must
    # have a forward of its own for dynamo to trace
    network = build()
    apply_switches(network, dataclasses.replace(PLAIN, compile=True))
    regions = compile_regions(network)
    counters = torch._dynamo.utils.counters
    counters.clear()
    x = torch.rand(2, 1, 2, 2) if isinstance(network, ATMEW) else torch.randn(2, 3, 16, 16)
    (network(x, torch.rand(2)) if isinstance(network, DDPMUNet) else network(x)).mean().backward()
    traced = counters["stats"]["unique_graphs"]
    assert traced >= len({type(region) for region in regions}), (traced, regions)
    assert not counters["graph_break"]


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["compile", "compile_cuda_graphs"])
def test_cuda_graphs_compile_every_region_in_reduce_overhead_mode(monkeypatch, cuda_graphs):
    # The CPU resolves cuda_graphs off, and compiled regions run the same either way: only the
    # mode each region is compiled with shows that the switch reached them.
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **options: compiled.append((module, options)))
    network = small_unet()
    apply_switches(network, dataclasses.replace(PLAIN, compile=True, cuda_graphs=cuda_graphs))
    mode = "reduce-overhead" if cuda_graphs else None
    assert [module for module, _ in compiled] == compile_regions(network)
    assert all(options == {"mode": mode, "dynamic": False} for _, options in compiled), compiled


def test_switched_networks_keep_their_state_dict_keys_and_outputs(eager_compile):
    torch.manual_seed(0)
    plain = small_unet()
    switched = copy.deepcopy(plain)
    every = dataclasses.replace(PLAIN, channels_last=True, compile=True, sdpa=False, activation_checkpointing=True)
    apply_switches(switched, every)
    assert list(switched.state_dict()) == list(plain.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in switched.parameters() if p.dim() == 4)
    assert all(not module.use_sdpa for module in switched.modules() if isinstance(module, FullAttention))
    assert all(block._compiled_call_impl is not None for block in compile_regions(switched))
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    expected, actual = plain(x, t), switched(x.to(memory_format=torch.channels_last), t)
    assert torch.allclose(actual, expected, atol=1e-5)
    expected.square().mean().backward()
    actual.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), switched.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_a_deep_copy_of_a_switched_network_runs_its_own_weights(eager_compile):
    # DDGAN's EMA deep-copies the prepared G: the copy must not call back into the original
    network = apply_switches(small_unet(), dataclasses.replace(PLAIN, compile=True, activation_checkpointing=True))
    shadow = copy.deepcopy(network)
    with torch.no_grad():
        for parameter in shadow.parameters():
            parameter.mul_(0.5)
    plain = small_unet()
    plain.load_state_dict(shadow.state_dict())
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    assert torch.allclose(shadow(x, t), plain(x, t), atol=1e-5)
    assert not torch.allclose(network(x, t), shadow(x, t), atol=1e-3)


def test_activation_checkpointing_stores_less_and_gives_the_same_gradients(monkeypatch):
    checkpointed_calls = []  # the blocks that ran through torch.utils.checkpoint

    def spy(forward, block, *inputs, **options):
        checkpointed_calls.append(block)
        return torch.utils.checkpoint.checkpoint(forward, block, *inputs, **options)

    monkeypatch.setattr(performance, "checkpoint", spy)
    torch.manual_seed(0)
    plain = small_unet()
    checkpointed = apply_switches(copy.deepcopy(plain), dataclasses.replace(PLAIN, activation_checkpointing=True))
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    outputs = {}
    stored = {name: saved_bytes(lambda net=net, name=name: outputs.__setitem__(name, net(x, t)))
              for name, net in (("plain", plain), ("checkpointed", checkpointed))}
    assert stored["checkpointed"] < stored["plain"] / 2
    for name in outputs:
        outputs[name].square().mean().backward()
    assert torch.equal(outputs["plain"], outputs["checkpointed"])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert set(checkpointed_calls) == set(performance.repeated_blocks(checkpointed))
    checkpointed_calls.clear()
    with torch.no_grad():  # sampling: nothing to recompute, nothing stored, no checkpoint's bookkeeping
        assert torch.equal(plain(x, t), checkpointed(x, t))
    assert checkpointed_calls == []


def test_fused_norm_runs_each_norm_with_its_film_and_silu_as_one_operation(monkeypatch):
    torch.manual_seed(0)
    plain = small_unet(latent_dim=4)  # DDGAN's U-Net: both norms of a ResBlock take a FiLM
    fused = apply_switches(copy.deepcopy(plain), dataclasses.replace(PLAIN, fused_norm=True))
    calls = []

    def recorded(x, groups, weight, bias, eps, scale=None, shift=None, silu=False):
        calls.append((scale is not None, silu))
        return group_norm_activation(x, groups, weight, bias, eps, scale, shift, silu)

    group_norm_activation = norms.group_norm_activation
    monkeypatch.setattr(norms, "group_norm_activation", recorded)
    x, t, z = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 4)
    outputs, stored = {}, {}
    for name, network in (("plain", plain), ("fused", fused)):
        stored[name] = saved_bytes(lambda network=network, name=name: outputs.__setitem__(name, network(x, t, z)))
    blocks = sum(isinstance(module, ResBlock) for module in plain.modules())
    group_norms = sum(isinstance(module, GroupNorm) for module in plain.modules())
    assert len(calls) == group_norms  # every norm, once, and none in the plain network
    assert calls.count((True, True)) == 2 * blocks  # both norms of each ResBlock with FiLM and SiLU
    assert calls.count((False, False)) == group_norms - 2 * blocks  # the attention blocks' norms
    # autograd keeps the norms' inputs only, not their outputs or the SiLUs' inputs (0.82x of
    # everything this small U-Net keeps, attention included)
    assert stored["fused"] < 0.9 * stored["plain"], stored
    torch.testing.assert_close(outputs["fused"], outputs["plain"], atol=1e-5, rtol=1e-4)
    for output in outputs.values():
        output.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_norm_takes_the_instance_norms_of_both_pix2pix_networks_and_r1_through_patchgan():
    torch.manual_seed(0)
    fused_switches = dataclasses.replace(PLAIN, fused_norm=True, channels_last=True)
    plain_g = UNetGenerator(3, 3, 32, ngf=8, norm="instance", dropout=0.0)  # dropout: other draws either way
    plain_d = PatchGAN(6, ndf=8, norm="instance")
    fused_g, fused_d = (apply_switches(copy.deepcopy(network), fused_switches) for network in (plain_g, plain_d))
    for network in (fused_g, fused_d):
        norms = [module for module in network.modules() if isinstance(module, InstanceNorm)]
        assert norms and all(norm.fused for norm in norms), type(network).__name__
    source = torch.randn(2, 3, 32, 32)
    for plain, fused, penalised in ((plain_g, fused_g, False), (plain_d, fused_d, True)):
        x = (torch.cat([source, plain_g(source).detach()], dim=1) if penalised else source).requires_grad_()
        x_nhwc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        outputs = {"plain": plain(x), "fused": fused(x_nhwc)}
        torch.testing.assert_close(outputs["fused"], outputs["plain"], atol=1e-5, rtol=1e-4)
        for name, inputs in (("plain", x), ("fused", x_nhwc)):
            if penalised:  # D: R1, the gradient at its input differentiated once more
                torch.manual_seed(1)  # R1's random signs: the same draws for both
                loss = r1_penalty(outputs[name], inputs) + outputs[name].mean()
            else:
                loss = outputs[name].square().mean()
            loss.backward()
        for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=f"{type(plain).__name__} {name}")


@pytest.mark.parametrize("method", ["pix2pix", "atme", "ddgan"])
def test_a_session_with_switches_trains_like_the_plain_one(method):
    # DDGAN draws diffusion noise for channels_last tensors: the same draws either way. pix2pix's
    # dropout masks would not be (drawn in memory order): its generator here has none.
    data = SyntheticPairs(8, 32, 2, load_size=36)
    overrides = {}
    if method == "pix2pix":  # R1 too: the D-reg phase differentiates twice through D's fused instance norms
        overrides = {"generator": {**SMALL_METHODS["pix2pix"]["generator"], "dropout": 0.0},
                     "loss": {**SMALL_METHODS["pix2pix"]["loss"], "r1_gamma": 0.05, "r1_interval": 2}}
    curves = {}
    plain = {"autocast": "none", "channels_last": False, "fused_adam": False, "compile": False, "cuda_graphs": False,
             "sdpa": True, "activation_checkpointing": False}
    switched = {"channels_last": True, "sdpa": False, "activation_checkpointing": True, "fused_norm": True}
    for name, switches in (("plain", {}), ("switched", switched)):
        session = session_for(method, {**plain, **switches}, CPU, data, overrides)
        fusable = [module for network in session.method.networks().values()  # pix2pix: its instance norms
                   for module in unwrap(network).modules() if isinstance(module, GroupNorm | InstanceNorm)]
        assert fusable and all(norm.fused == (name == "switched") for norm in fusable)
        data.epoch = 0
        curves[name] = []
        for batch in data.steps(3):
            session.train_step(batch)
            curves[name].append({key: float(value) for key, value in session.stats.step_values.items()})
    for plain_step, switched_step in zip(curves["plain"], curves["switched"]):
        assert switched_step.keys() == plain_step.keys()
        for key in {"loss/G", "loss/D", "loss/G_L1", "loss/R1"} & plain_step.keys():
            assert switched_step[key] == pytest.approx(plain_step[key], rel=1e-4, abs=1e-5), key


# The networks each phase runs (a method's begin_step shares its forward passes with the phases).
PHASE_NETWORKS = {
    "pix2pix": {("begin_step", "G"), ("D-main", "D"), ("D-reg", "D"), ("G-main", "D")},
    "atme": {("begin_step", "G"), ("begin_step", "W"), ("D-main", "D"), ("D-reg", "D"), ("G-main", "D")},
    "ddgan": {("D-main", "G"), ("D-main", "D"), ("D-reg", "D"), ("G-main", "G"), ("G-main", "D")},
}


@pytest.mark.parametrize(("method", "pix2pix_norm"), [("pix2pix", "instance"), ("pix2pix", "batch"), ("atme", None),
                                                     ("ddgan", None)],
                         ids=["pix2pix", "pix2pix_batch_norms", "atme", "ddgan"])
def test_bf16_nhwc_end_to_end_and_fused_adam_reach_every_network_in_every_phase(method, pix2pix_norm):
    # A phase that left out its autocast, a batch left in NCHW or a norm that returns NCHW trains
    # as well on the CPU and only runs slower on a GPU, where no test runs it: with bf16,
    # channels_last and fused_norm, every convolution of every network, in every phase, must
    # compute in bf16 on a channels_last input. (pix2pix's shipped networks have instance norms,
    # which only the fused norm keeps in NHWC, D-reg's second-order gradient included; the
    # reference preset the GPU check's pix2pix rows measure has batch norms.)
    data = SyntheticPairs(8, 32, 2, load_size=36)
    overrides = {"loss": {**SMALL_METHODS[method]["loss"], "r1_gamma": 0.05, "r1_interval": 2}}  # D-reg at step 0
    if pix2pix_norm:
        overrides |= {network: {**SMALL_METHODS[method][network], "norm": pix2pix_norm}
                      for network in ("generator", "discriminator")}
    switches = {"autocast": "bf16", "channels_last": True, "fused_adam": True, "fused_norm": True}
    session = session_for(method, switches, CPU, data, overrides)
    assert all(optimizer.defaults["fused"] for optimizer in session.optimizers.values())
    convolutions = []  # (phase, network, output dtype, input in channels_last)
    phase = "begin_step"

    def record(network: str):
        def hook(module, inputs, output):
            convolutions.append((phase, network, output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))
        return hook

    for name, network in session.method.networks().items():
        for module in unwrap(network).modules():
            if isinstance(module, torch.nn.modules.conv._ConvNd):
                module.register_forward_hook(record(name))
    accumulate = session.method.accumulate_gradients

    def in_phase(name, *args):
        nonlocal phase
        phase = name
        return accumulate(name, *args)

    session.method.accumulate_gradients = in_phase
    for batch in data.steps(2):
        phase = "begin_step"
        session.train_step(batch)
    assert {(phase, network) for phase, network, _, _ in convolutions} == PHASE_NETWORKS[method]
    assert [entry for entry in convolutions if entry[2] != torch.bfloat16] == []
    assert [entry for entry in convolutions if not entry[3]] == []


@pytest.mark.cuda
@pytest.mark.compiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_blocks_equal_eager_blocks_on_cuda(dtype):
    torch.manual_seed(0)
    plain = small_unet(width=32, groups=8, attention_heads=4, attention_head_dim=32).to(CUDA)
    compiled = apply_switches(copy.deepcopy(plain), dataclasses.replace(PLAIN, channels_last=True, compile=True))
    x, t = torch.randn(4, 3, 64, 64, device=CUDA), torch.rand(4, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        expected = plain(x, t)
        actual = compiled(x.to(memory_format=torch.channels_last), t)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert (actual.float() - expected.float()).abs().max() <= tolerance
    actual.float().square().mean().backward()
    expected.float().square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), compiled.parameters()):
        scale = a.grad.abs().max().clamp(min=1e-6)
        assert ((a.grad - b.grad).abs().max() / scale) <= (1e-3 if dtype == torch.float32 else 0.1), name


@pytest.mark.cuda
def test_bf16_group_norm_keeps_float32_statistics_on_cuda():
    from components.networks.norms import GroupNorm

    norm = GroupNorm(8, 64).to(CUDA)
    # a large offset: bf16 sums over 65,536 positions would lose the variance
    x = (torch.randn(2, 64, 256, 256, device=CUDA) * 0.01 + 3.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    reference = torch.nn.functional.group_norm(x.bfloat16().float(), 8, norm.weight, norm.bias, norm.eps)
    assert (out.float() - reference).abs().max() <= 0.05


@pytest.mark.cuda
def test_sdpa_and_written_out_attention_agree_on_cuda():
    attention = FullAttention(256, 4, 32, 8).to(CUDA)
    x = torch.randn(2, 256, 32, 32, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = attention(x)
        attention.use_sdpa = False
        written_out = attention(x)
    assert (fused.float() - written_out.float()).abs().max() <= 5e-2


@pytest.mark.cuda
@pytest.mark.compiles
@pytest.mark.parametrize("method", ["pix2pix", "atme"])
def test_every_switch_at_once_trains_on_cuda(method):
    # CUDA graphs over compiled blocks, bf16, channels_last, fused Adam, checkpointing together
    # (bench/gpu_check.py's correctness section runs every method with each switch)
    every = {"autocast": "bf16", "channels_last": True, "fused_adam": True, "compile": True, "cuda_graphs": True,
             "sdpa": True, "activation_checkpointing": True}
    data = SyntheticPairs(16, 32, 4, load_size=36)
    session = session_for(method, every, CUDA, data)
    assert session.switches.cuda_graphs and session.switches.compile
    for batch in data.steps(6):
        session.train_step(batch)
    metrics = session.end_epoch()
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values()), metrics
    assert session.sample(batch["source"]).isfinite().all()
