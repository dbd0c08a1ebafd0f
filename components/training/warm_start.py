"""Starting a training from the networks an earlier one was trained to (`pairgan retrain`, start_from: champion).

A start-weights file holds the model params and the state dict of every trainable network (G,
D, and ATME's W) from a finished run's last checkpoint. A job given one (`TrainingJob.start_weights`)
loads it into its networks before the first step, unless it resumes its own checkpoint. The
optimisers, the LR schedule and the method's own state (DDGAN's EMA, which warms up from the
loaded G within a few steps; ATME's memory; the augmentation probability) start afresh: the
new run is a fine-tuning on the grown data set for `epochs` epochs, not a continuation of the
old run's schedule.
"""

from pathlib import Path
from typing import Any

import torch

from components.config.flatten import changed_keys
from components.config.model import ModelParams
from components.methods.base import unwrap
from components.object_store import download_file, is_s3_uri, s3_client
from components.training.checkpoints import STATE_FILE

FORMAT = "pairgan-start-weights/1"


def write_start_weights(checkpoint_folder: Path, destination: Path) -> None:
    """The networks of the checkpoint in `checkpoint_folder` (its state.pt) as a start-weights file."""
    state = torch.load(checkpoint_folder / STATE_FILE, map_location="cpu", weights_only=True)
    torch.save({"format": FORMAT, "model": state["model"], "networks": state["networks"]}, destination)


def read_start_weights(location: str, client: Any = None) -> dict:
    """A start-weights file from a local path or s3://; raises ValueError for anything else."""
    if is_s3_uri(location):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="pairgan-start-") as folder:
            local = Path(folder) / "weights.pt"
            download_file(client or s3_client(), location, local)
            saved = torch.load(local, map_location="cpu", weights_only=True)
    else:
        saved = torch.load(location, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{location}: not a start-weights file ({FORMAT})")
    return saved


def start_weights_mismatch(saved: dict, model: ModelParams) -> list[str]:
    """The model params keys in which the saved networks differ from `model` (none: they load)."""
    return changed_keys(saved["model"], model.model_dump(mode="json"))


def load_start_weights(session, saved: dict) -> None:
    """Load the saved networks into the session's (before DDP's first step; every rank loads the same)."""
    mismatch = start_weights_mismatch(saved, session.model)
    if mismatch:
        raise ValueError(f"the start weights were trained with other model params: {', '.join(mismatch)}")
    for name, network in session.method.networks().items():
        unwrap(network).load_state_dict(saved["networks"][name])
