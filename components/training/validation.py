"""The validation score per epoch: a fixed subset of the val split, scored as evaluate scores the test split.

The subset is the split's first `validation.samples` samples in index order (the evaluation
loader's order, no crop, no flip), decoded once when training starts and kept on the CPU, so
every epoch and every run of the same data scores the same images. Worker rank 0 scores them
with the sampler the exported generator would use (the method's `make_sampler` inside a
`Translator`: EMA weights for DDGAN, ATME's constant map) through `score_held_out`, the code
evaluate runs, and reports `val/l1`, `val/psnr`, `val/ssim` with the epoch's metrics.

For DDGAN trained with guidance, the subset is also scored after the last epoch at every
weight of `validation.guidance_weights` (`sweep_guidance`), reported as
`val/guidance/<metric>_w<w>`: the weight is a sampling-time knob, so a sweep finds the best one
without retraining.

Scoring draws its own noise from a fixed seed; the training RNG state is saved before and
restored after, so validating does not change what training does next.
"""

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from components.config.data import LoaderParams
from components.config.train import ValidationParams
from components.data.batch import Batch
from components.data.loaders import make_loader
from components.data.manifest import load_manifest
from components.evaluation.held_out import score_held_out, sweep_guidance
from components.methods.translator import Translator

logger = logging.getLogger(__name__)

VALIDATION_SPLIT = "val"
VALIDATION_METRICS = ("l1", "psnr", "ssim")
# Ray Tune flattens nested results on "/": a key must never be both a leaf and a prefix of
# another key, hence `val/guidance/psnr_w0.5` beside `val/psnr`, not `val/psnr/w0.5`.
GUIDANCE_PREFIX = "val/guidance/"
# The sampling noise (DDGAN's latents) of every validation pass: the same images every epoch.
VALIDATION_SEED = 0


def guidance_metric_key(metric: str, weight: float) -> str:
    """`val/guidance/psnr_w0.5`: the subset's score at guidance weight w."""
    return f"{GUIDANCE_PREFIX}{metric}_w{float(weight):g}"


class EpochValidation:
    """Scores the kept subset; `due(epoch, epochs)` says when."""

    def __init__(self, params: ValidationParams, batches: list[Batch], device: torch.device):
        self.params = params
        self.batches = batches
        self.device = torch.device(device)
        self.samples = sum(len(batch["index"]) for batch in batches)

    @classmethod
    def from_split(
        cls, params: ValidationParams, data: Path | str, loader: LoaderParams, batch_size: int,
        device: torch.device, expected_checksum: str | None = None,
    ) -> "EpochValidation | None":
        """Decode the subset once; None (with a warning) when validation is off or there is no val split.

        data: the prepared data set, local or s3:// (as the training loader reads it);
        expected_checksum: the manifest checksum the job started from.
        """
        if params.samples == 0:
            return None
        manifest = load_manifest(data)
        split = manifest.splits.get(VALIDATION_SPLIT)
        if split is None or split.count == 0:
            logger.warning(
                "%s has no %r samples: no validation score (val/...) this run; prepare a val split "
                "(params/data.yaml val_fraction) or set validation.samples: 0 in params/train.yaml",
                manifest.location, VALIDATION_SPLIT,
            )
            return None
        wanted = min(params.samples, split.count)
        held_out = make_loader(data, VALIDATION_SPLIT, loader, min(batch_size, wanted), train=False, device=device,
                               expected_checksum=expected_checksum)
        batches, kept = [], 0
        for batch in held_out:
            take = min(wanted - kept, len(batch["index"]))
            batches.append({key: value[:take].detach().cpu().clone() for key, value in batch.items()})
            kept += take
            if kept == wanted:
                break
        return cls(params, batches, device)

    def due(self, epoch: int, epochs: int) -> bool:
        return epoch >= epochs or epoch % self.params.every_epochs == 0

    @contextlib.contextmanager
    def _generator(self, session) -> Iterator[Translator]:
        # The exported generator's sampler around the live weights; eval mode (dropout off,
        # BatchNorm running statistics) only while scoring.
        sampler = session.method.make_sampler()
        was_training = sampler.training
        sampler.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                yield Translator(sampler, session.model.method.name, session.model.image_size)
        finally:
            sampler.train(was_training)

    def score(self, session, final: bool) -> dict[str, float]:
        """`val/l1`, `val/psnr`, `val/ssim` of the subset; after the last epoch also the guidance sweep."""
        with self._generator(session) as translator:
            scores = score_held_out(translator, self.batches, self.device, seed=VALIDATION_SEED)
            metrics = {f"val/{name}": scores.means[name] for name in VALIDATION_METRICS}
            if final and translator.supports_guidance and self.params.guidance_weights:
                table = sweep_guidance(
                    translator, lambda: self.batches, self.params.guidance_weights, self.device, seed=VALIDATION_SEED
                )
                for row in table:
                    metrics.update({guidance_metric_key(name, row["w"]): row[name] for name in VALIDATION_METRICS})
        logger.info(
            "validation (%d %s samples): L1 %.4f  PSNR %.2f dB  SSIM %.4f",
            self.samples, VALIDATION_SPLIT, metrics["val/l1"], metrics["val/psnr"], metrics["val/ssim"],
        )
        return metrics
