"""Running a translator over a held-out split: per-image metrics, FID/KID, latency, guidance sweep.

`evaluate_translator` makes every pass the evaluate stage needs, with progress; the functions
it calls are the building blocks other code reuses (the register gate, validation during training).

Works on any `nn.Module` mapping source -> image in [-1, 1] (a `Translator`, or the module
`mlflow.pytorch.load_model` returns), so the register gate scores the champion it loads from
the registry exactly as evaluate scores a fresh model.
"""

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from components.config.evaluate import EvaluateParams, FeatureParams, LatencyParams
from components.data.batch import Batch
from components.evaluation.features import FeatureExtractor, fid_from_features, kid_from_features
from components.evaluation.image_metrics import l1_per_image, psnr_per_image, ssim_per_image
from components.evaluation.progress import EvaluationProgress

log = logging.getLogger(__name__)

@dataclass
class HeldOutScores:
    """What one pass over the held-out split measured."""

    per_image: list[dict[str, float | int]]  # one row per sample: index, l1, psnr, ssim
    means: dict[str, float]  # l1, psnr, ssim, and fid/kid/kid_std when features were extracted
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # source, generated, target (CPU, C x H x W)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(value) for value in self.means.values())


def pick_device(choice: str) -> torch.device:
    """"auto": the GPU when there is one; "cuda" without one is an error rather than a silent CPU run."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is cuda but no CUDA GPU is visible")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _seed_everything(seed: int, device: torch.device) -> None:
    # The translator's sampling noise (DDGAN's latents, ATME's map jitter) is drawn from the
    # global generators: seeding them makes two passes over the same split comparable.
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


@torch.no_grad()
def score_held_out(
    translator: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    *,
    seed: int = 0,
    max_samples: int | None = None,
    extractor: FeatureExtractor | None = None,
    features: FeatureParams | None = None,
    keep_samples: int = 0,
) -> HeldOutScores:
    """Translate every source of `batches` and score it against its target.

    The translator must already be in eval mode (the caller's choice: a module loaded from a
    pt2 graph is frozen in eval mode and refuses `.eval()`).

    FID/KID are computed when an `extractor` is given (with `features` for the KID subsets).
    The first `keep_samples` samples are kept for the sample grid.
    """
    if extractor is not None and features is None:
        raise ValueError("an extractor needs FeatureParams for its KID subsets")
    _seed_everything(seed, device)
    rows: list[dict[str, float | int]] = []
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real_features: list[np.ndarray] = []
    fake_features: list[np.ndarray] = []
    for batch in batches:
        source, target, index = batch["source"], batch["target"], batch["index"]
        if max_samples is not None:
            remaining = max_samples - len(rows)
            if remaining <= 0:
                break
            source, target, index = source[:remaining], target[:remaining], index[:remaining]
        generated = translator(source.to(device, non_blocking=True)).float()
        target = target.to(device, non_blocking=True)
        for position, (l1, psnr, ssim) in enumerate(
            zip(l1_per_image(generated, target), psnr_per_image(generated, target), ssim_per_image(generated, target))
        ):
            rows.append({"index": int(index[position]), "l1": float(l1), "psnr": float(psnr), "ssim": float(ssim)})
        if extractor is not None:
            real_features.append(extractor(target).double().cpu().numpy())
            fake_features.append(extractor(generated).double().cpu().numpy())
        for position in range(min(keep_samples - len(samples), len(source))):
            samples.append((source[position].cpu(), generated[position].cpu(), target[position].cpu()))
    if not rows:
        raise ValueError("the held-out split yielded no samples")
    means = {name: float(np.mean([row[name] for row in rows])) for name in ("l1", "psnr", "ssim")}
    if extractor is not None:
        real, fake = np.concatenate(real_features), np.concatenate(fake_features)
        means["fid"] = fid_from_features(real, fake)
        means["kid"], means["kid_std"] = kid_from_features(
            real, fake, features.kid_subset_size, features.kid_subsets, seed
        )
    return HeldOutScores(per_image=rows, means=means, samples=samples)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_images(example_batch_size: int, params: LatencyParams) -> int:
    """Images `measure_latency` translates: every call at batch 1 and at the example's batch size."""
    return (params.warmup + params.repeats) * (1 + example_batch_size)


@torch.no_grad()
def measure_latency(
    translator: nn.Module,
    example_source: torch.Tensor,
    device: torch.device,
    params: LatencyParams,
    *,
    on_images: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Wall time per translated image, at batch 1 and at the example's batch size (median of repeats).

    `on_images(n)` is called after each call (outside the timed part) with the images it translated.
    """
    result = {}
    for label, source in (("batch1", example_source[:1]), ("batched", example_source)):
        source = source.to(device)
        for _ in range(params.warmup):
            translator(source)
            if on_images is not None:
                on_images(len(source))
        _synchronize(device)
        times = []
        for _ in range(params.repeats):
            start = time.perf_counter()
            translator(source)
            _synchronize(device)
            times.append(time.perf_counter() - start)
            if on_images is not None:
                on_images(len(source))
        result[f"latency_ms_per_image_{label}"] = 1000.0 * float(np.median(times)) / len(source)
    result["latency_batch_size"] = len(example_source)
    return result


def sweep_guidance(
    translator: nn.Module,
    make_batches: Callable[[], Iterable[Batch]],
    weights: list[float],
    device: torch.device,
    **score_options,
) -> list[dict[str, float]]:
    """Scores and NFE per guidance weight w (same seed for every w), restoring the translator's own w after.

    `score_options` are passed to `score_held_out` (seed, max_samples, extractor, features).
    """
    if not getattr(translator, "supports_guidance", False):
        raise ValueError("this translator has no guidance weight to sweep")
    original = translator.guidance_weight
    table = []
    try:
        for weight in weights:
            translator.guidance_weight = weight
            scores = score_held_out(translator, make_batches(), device, **score_options)
            # NFE can depend on w (classifier-free guidance doubles the generator calls)
            table.append({"w": float(weight), "nfe": int(translator.nfe), **scores.means})
    finally:
        translator.guidance_weight = original
    return table


@dataclass
class Evaluation:
    """Every pass of one evaluation."""

    scores: HeldOutScores
    latency: dict[str, float]  # see measure_latency
    sweep: list[dict[str, float]]  # see sweep_guidance; empty for a translator without guidance


def evaluate_translator(
    translator: nn.Module,
    make_batches: Callable[[], Iterable[Batch]],
    split_size: int,
    device: torch.device,
    params: EvaluateParams,
    extractor: FeatureExtractor | None = None,
) -> Evaluation:
    """Score, time and (with guidance) sweep `translator` on the held-out batches `make_batches()` yields.

    `split_size`: samples in the split (the progress plan; `params.max_samples` caps it).
    """
    images = min(split_size, params.max_samples or split_size)
    weights = params.guidance_sweep.weights if getattr(translator, "supports_guidance", False) else []
    example = next(iter(make_batches()))["source"]
    timed = latency_images(len(example), params.latency)
    progress = EvaluationProgress(images * (1 + len(weights)) + timed)
    log.info(
        "evaluating on %s: %d %s images, latency at batch 1 and %d%s",
        device.type, images, params.split, len(example),
        f", guidance sweep over w = {', '.join(f'{w:g}' for w in weights)}" if weights else "",
    )
    score_options = {
        "seed": params.seed, "max_samples": params.max_samples, "extractor": extractor, "features": params.features,
    }
    scores = score_held_out(
        translator, progress.track(f"scoring {params.split}", images, make_batches()), device,
        keep_samples=params.grid_samples, **score_options,
    )
    with progress.step("latency", timed) as advance:
        latency = measure_latency(translator, example, device, params.latency, on_images=advance)
    sweep = []
    for weight in weights:
        def batches_for_this_weight(weight: float = weight) -> Iterator[Batch]:
            return progress.track(f"guidance sweep w={weight:g}", images, make_batches())

        sweep += sweep_guidance(translator, batches_for_this_weight, [weight], device, **score_options)
    return Evaluation(scores=scores, latency=latency, sweep=sweep)
