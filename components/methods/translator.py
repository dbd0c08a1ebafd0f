"""The exported generator: one nn.Module with the method's sampling inside.

Evaluation, registry and predict use only this. The export is plain data (the model params
as a dict, tensors, numbers), saved with torch.save and read back with weights_only=True.
`forward` has no data-dependent Python control flow, so torch.export (MLflow's pt2) works;
DDGAN's noise comes from torch.randn (set `seed` only for reproducible eager sampling).
"""

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from components.atomic_files import atomic_path
from components.config.model import ModelParams
from components.methods.base import Sampler
from components.methods.registry import build_sampler

if TYPE_CHECKING:
    from components.training.loop import TrainingSession

FORMAT_VERSION = 1


class Translator(nn.Module):
    """source (N x C x H x W in [-1, 1]) -> translated image in [-1, 1].

    `image_size`: the size it was trained at (H = W); it translates images of that size only.
    """

    def __init__(self, sampler: Sampler, method: str, image_size: int):
        super().__init__()
        self.sampler = sampler
        self.method = method
        self.image_size = image_size

    @property
    def nfe(self) -> int:
        """Generator calls per image (DDGAN: T, or 2T with guidance)."""
        return self.sampler.nfe

    @property
    def supports_guidance(self) -> bool:
        return self.sampler.guidance_trained

    @property
    def guidance_weight(self) -> float:
        return self.sampler.guidance_weight if self.supports_guidance else 0.0

    @guidance_weight.setter
    def guidance_weight(self, weight: float) -> None:
        if not self.supports_guidance:
            raise ValueError(
                f"this {self.method} generator has no guidance: only DDGAN trained with `guidance:` "
                "(condition dropout) can be guided"
            )
        if weight < 0:
            raise ValueError(f"guidance_weight must be >= 0, got {weight}")
        self.sampler.guidance_weight = float(weight)

    @property
    def seed(self) -> int | None:
        return self.sampler.seed

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.sampler(source).clamp(-1.0, 1.0)


def export_translator(session: "TrainingSession", metadata: dict | None = None) -> dict:
    """The session's generator as plain data: model params, sampler state, metadata."""
    sampler = session.method.make_sampler()
    return {
        "format_version": FORMAT_VERSION,
        "model": session.model.model_dump(mode="json"),
        "sampler_state": {name: value.detach().cpu().clone() for name, value in sampler.state_dict().items()},
        "guidance_weight": float(sampler.guidance_weight),
        "metadata": {"method": session.model.method.name, "step": session.step, "epoch": session.epoch, **(metadata or {})},
    }


EXPORT_KEYS = ("format_version", "model", "sampler_state", "guidance_weight")


def translator_from_export(exported: dict) -> Translator:
    """Raises ValueError, saying what is wrong, for anything that is not an export of this format."""
    if not isinstance(exported, dict):
        raise ValueError(f"not an exported generator: it holds a {type(exported).__name__}, not the export's dict")
    missing = [key for key in EXPORT_KEYS if key not in exported]
    if missing:
        # A training checkpoint (state.pt) has a format_version and model but no sampler_state.
        raise ValueError(
            f"not an exported generator (models/generator.pt or a checkpoint's generator.pt): "
            f"it lacks {', '.join(missing)}"
        )
    if exported["format_version"] != FORMAT_VERSION:
        raise ValueError(f"unsupported translator format {exported['format_version']!r}, expected {FORMAT_VERSION}")
    model = ModelParams.model_validate(exported["model"])
    sampler = build_sampler(model)
    try:
        sampler.load_state_dict(exported["sampler_state"])
    except RuntimeError as error:
        raise ValueError(f"its weights do not fit its model params: {error}") from error
    translator = Translator(sampler, model.method.name, model.image_size)
    if translator.supports_guidance:
        translator.guidance_weight = exported["guidance_weight"]
    return translator.eval()


def save_translator(path: Path | str, session: "TrainingSession", metadata: dict | None = None) -> None:
    with atomic_path(path) as temporary:  # never leave a half-written generator behind
        torch.save(export_translator(session, metadata), temporary)


def load_translator(path: Path | str, map_location: str | torch.device = "cpu") -> Translator:
    """The Translator saved at `path`; a file that is not one raises ValueError naming the file."""
    try:
        exported = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError) as error:
        # What torch.load raises for a file that is not a torch.save of plain data (a truncated
        # or foreign file, or one that needs pickled code, which weights_only=True refuses).
        raise ValueError(
            f"{path}: not a pairgan generator file: torch.load(weights_only=True) failed with {type(error).__name__}"
        ) from error
    try:
        return translator_from_export(exported)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
