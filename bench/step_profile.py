"""Where one method's training step spends its time: images/s and peak memory per switch set,
and the step's heaviest CUDA kernels.

    python bench/step_profile.py --method atme --batch-size 32 --out OUT \
        --variant shipped '{}' --variant compiled '{"compile": true}' --kernels 30

Each `--variant NAME JSON` is measured in turn in this process: the JSON overrides keys of
params/train.yaml `performance:` (`{}`: the shipped switches, auto). The step is the product's
(`TrainingSession.train_step`, every phase) at the method's reference architecture
(bench/workloads.py), on one batch of random images kept on the device. `--kernels N` runs
the first variant's step under torch.profiler and prints its N kernels with the most device
time, the device time by kind of kernel (convolution, matrix product, norm, layout copy,
elementwise, compiled), and the N places with the most copy time (layout changes and casts),
each named by the operator that made the copy and its callers. Results go to
OUT/step_profile.json and OUT/kernels_<variant>.txt.
`--method-overrides JSON` replaces keys of the reference preset's `method:` block (merged, as
`--variant` does for the switches), e.g. `'{"generator": {"norm": "instance"}}'` for pix2pix
with the instance norms of the shipped params/model.yaml; the row records the `method:` block
measured.
`--compile-cache FOLDER` loads the compile cache kept there before the variants and saves it
after them, as a training run does with `performance.compile_cache`: run a compiled variant
twice, each time with a new empty TORCHINDUCTOR_CACHE_DIR, and the second warm-up is what a new
machine pays with the cache.
Runs on the GPU image of bench/gpu_check.py (no Ray, MLflow, DALI, WebDataset or boto3).
"""

import argparse
import itertools
import json
import re
import time
from pathlib import Path

import torch
import workloads

from components.config.model import ModelParams
from components.training.compile_cache import CompileCache
from components.training.loop import TrainingSession

# Kernel name patterns -> kind, first match wins (the names are cuDNN's, cuBLAS's, ATen's, Inductor's and
# components/networks/group_norm_triton.py's).
KERNEL_KINDS = (
    ("fused group norm", r"_moments_kernel|_affine_activation_kernel|_gradient_sums_kernel|_input_gradient_kernel"),
    ("layout copy", r"nchwToNhwc|nhwcToNchw|transpose|permute|copy_kernel|CatArrayBatchedCopy"),
    ("convolution", r"conv|implicit_?gemm|xmma_fprop|xmma_dgrad|xmma_wgrad|cudnn|wgrad|dgrad|fprop"),
    ("matrix product", r"gemm|sm90_xmma|cutlass|ampere_|Kernel2|flash|fmha|attention"),
    ("norm", r"norm|welford|moments|Moments"),
    ("softmax", r"softmax|SoftMax"),
    ("compiled (Inductor)", r"^triton_"),
    ("optimizer", r"adam|Adam|multi_tensor"),
    ("reduction", r"reduce|Reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|Elementwise"),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name)), "other")


# How many operators above a copy name it in the copies table: the copy's own op, then
# the ones that asked for it (a reshape, a softmax's `.contiguous()`, an autograd node).
COPY_CALLERS = 4


def copies_by_caller(profiler: torch.profiler.profile, cuda: bool, steps: int) -> list[tuple[str, float, int]]:
    """(operator and its callers, ms per step, copies per step) of every copy, most time first.

    On CUDA: the "layout copy" kernels (`kernel_kind`) of each operator that launched them, so
    cuDNN's own NCHW <-> NHWC transposes are charged to the convolution. On the CPU: ATen's
    copies made for a clone or a `.to()` (a `.contiguous()`, a reshape that cannot view, a
    memory-format change), by their self time. Both include dtype casts, which copy too.
    """
    totals: dict[str, list[float]] = {}
    for event in profiler.events():
        if cuda:
            microseconds = sum(kernel.duration for kernel in event.kernels if kernel_kind(kernel.name) == "layout copy")
        elif event.name == "aten::copy_" and event.cpu_parent is not None \
                and event.cpu_parent.name in ("aten::clone", "aten::_to_copy"):
            microseconds = event.self_cpu_time_total
        else:
            continue
        if not microseconds:
            continue
        names, caller = [event.name], event.cpu_parent
        while caller is not None and len(names) <= COPY_CALLERS:
            names.append(caller.name)
            caller = caller.cpu_parent
        total = totals.setdefault(" < ".join(names), [0.0, 0])
        total[0] += microseconds / 1000 / steps
        total[1] += 1
    rows = [(callers, ms, round(count / steps)) for callers, (ms, count) in totals.items()]
    return sorted(rows, key=lambda row: -row[1])


def kernel_table(session: TrainingSession, batch: dict, steps: int, rows: int) -> tuple[str, dict[str, float]]:
    """The `rows` kernels with the most device time over `steps` steps, device ms per step by
    kind (on the CPU: the operators with the most self time), and the copies by the operators
    that made them."""
    cuda = session.device.type == "cuda"
    # the CPU operators too, to charge each copy kernel to the operator that launched it
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            session.train_step(batch)
        workloads.synchronize(session.device)
    wanted = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [event for event in profiler.key_averages() if event.device_type == wanted]

    def ms_per_step(event) -> float:
        return (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1000 / steps

    by_kind: dict[str, float] = {}
    for event in events:
        kind = kernel_kind(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + ms_per_step(event)
    events.sort(key=ms_per_step, reverse=True)
    total = sum(by_kind.values()) or 1.0
    lines = [f"{'ms/step':>8} {'share':>6} {'calls':>6}  {'kind':<20} kernel"]
    for event in events[:rows]:
        ms = ms_per_step(event)
        lines.append(f"{ms:8.2f} {ms / total:6.1%} {event.count // steps:6d}  {kernel_kind(event.key):<20} {event.key[:110]}")
    lines.append(f"device time by kind, ms per step (total {total:.1f}):")
    lines += [f"  {kind:<20} {ms:8.2f} {ms / total:6.1%}" for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    copies = copies_by_caller(profiler, cuda, steps)
    lines.append(f"copies (layout changes and casts) by the operators that made them ({len(copies)} places):")
    lines.append(f"{'ms/step':>8} {'copies':>6}  operator < its callers")
    lines += [f"{ms:8.2f} {count:6d}  {callers[:160]}" for callers, ms, count in copies[:rows]]
    return "\n".join(lines), {kind: round(ms, 2) for kind, ms in by_kind.items()}


def measure(name: str, overrides: dict, args: argparse.Namespace, model: ModelParams, batch: dict,
            kernels: int) -> dict:
    device = torch.device(args.device)
    before = workloads.compile_counts()
    workloads.release_device(device)  # each variant's warm-up includes its own compilation
    session = TrainingSession(model, workloads.train_params(args.batch_size, overrides), args.batch_size, device)
    started = time.perf_counter()
    warmup_s, _ = workloads.time_steps(session, itertools.repeat(batch), args.warmup, device)
    seconds, images = workloads.time_steps(session, itertools.repeat(batch), args.steps, device)
    peak = workloads.peak_memory_gib(device)
    finite = all(bool(torch.isfinite(value)) for value in session.stats.step_values.values())
    result = {
        "variant": name, "overrides": overrides, "switches": session.switches.summary(), "method": args.method,
        "model": model.method.model_dump(mode="json"),
        "batch_size": args.batch_size, "image_size": args.image_size, "images_per_s": round(images / seconds, 1),
        "step_ms": round(1000 * seconds / args.steps, 1), "warmup_s": round(warmup_s, 1),
        "peak_memory_gib": round(peak, 2), "gib_per_image": round(peak / args.batch_size, 3), "losses_finite": finite,
        "compiled": workloads.compiled_since(before),
    }
    if kernels:
        text, by_kind = kernel_table(session, batch, 2, kernels)
        result["device_ms_by_kind"] = by_kind
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        (args.out / f"kernels_{safe}.txt").write_text(text + "\n")
        print(f"--- {name}: heaviest kernels\n{text}", flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    del session
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="atme", choices=list(workloads.REFERENCE_PRESETS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN's search, compilation)")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True,
                        help="a name and the performance switches it overrides, as JSON ({} for the shipped ones)")
    parser.add_argument("--method-overrides", default="{}", metavar="JSON",
                        help="keys of the reference preset's method: block to replace, as JSON")
    parser.add_argument("--kernels", type=int, default=0, help="profile these many heaviest kernels of --profile-variants")
    parser.add_argument("--profile-variants", nargs="*", default=None, help="variants to profile (default: the first)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip the variants that start after this many seconds")
    parser.add_argument("--compile-cache", type=Path, default=None, help="a folder to load and save the compile cache in")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [(name, json.loads(text)) for name, text in args.variant]
    try:
        method_overrides = json.loads(args.method_overrides)
        if not isinstance(method_overrides, dict):
            raise ValueError(f"not a JSON object: {args.method_overrides}")
        model = workloads.model_params(args.method, args.image_size, method_overrides)
    except ValueError as error:  # not JSON, not an object, or a key the preset does not have (a ParamsError)
        parser.error(f"--method-overrides: {error}")
    profiled = set(args.profile_variants) if args.profile_variants is not None else {variants[0][0]}
    batch = workloads.random_batch(args.batch_size, args.image_size, args.batch_size, torch.device(args.device))
    compile_cache = None
    if args.compile_cache is not None:
        compile_cache = CompileCache(str(args.compile_cache), f"step_profile-{args.method}-{args.batch_size}-{args.image_size}")
        print(f"compile cache: {compile_cache.load()} entries loaded from {compile_cache.uri}", flush=True)
    started, results = time.monotonic(), []
    for name, overrides in variants:
        if time.monotonic() - started > args.budget_s:
            results.append({"variant": name, "status": "skipped", "reason": "time budget"})
            continue
        try:
            results.append({"status": "ok", **measure(name, overrides, args, model, batch, args.kernels if name in profiled else 0)})
        except Exception as error:  # one variant's failure (out of memory, a compiler error) is a row, not the end
            results.append({"variant": name, "status": "error", "error": f"{type(error).__name__}: {error}"[:1500]})
        print(json.dumps(results[-1]), flush=True)
        (args.out / "step_profile.json").write_text(json.dumps(results, indent=1) + "\n")
    if compile_cache is not None:
        print(f"compile cache: {'saved to' if compile_cache.save() else 'unchanged at'} {compile_cache.uri}", flush=True)
    width = max(len("variant"), *(len(row["variant"]) for row in results))
    print(f"{'variant':<{width}} {'img/s':>8} {'step ms':>8} {'GiB/img':>8} {'warm-up s':>9}")
    for row in results:
        if row["status"] == "ok":
            print(f"{row['variant']:<{width}} {row['images_per_s']:8.1f} {row['step_ms']:8.1f} "
                  f"{row['gib_per_image']:8.3f} {row['warmup_s']:9.1f}")
        else:
            reason = row.get("error", row.get("reason", "")).replace("\n", " ")
            print(f"{row['variant']:<{width}} {row['status']}: {reason[:100]}")


if __name__ == "__main__":
    main()
