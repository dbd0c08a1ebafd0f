"""A checkpoint's files: the complete training state, the job record, and at the end the exported generator.

    state.pt        TrainingSession.state_dict() (loadable with weights_only=True)
    checkpoint.json {"job": <job record>, "method", "epoch", "step", "final"}
    generator.pt    the exported Translator, in the job's last checkpoint only ("final": true)
"""

import json
from pathlib import Path

import torch

STATE_FILE = "state.pt"
GENERATOR_FILE = "generator.pt"
INFO_FILE = "checkpoint.json"


def checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    return epoch == epochs or epoch % every == 0


def load_checkpoint(checkpoint, device: torch.device) -> tuple[dict, dict]:
    """(info, state) of a Ray checkpoint."""
    with checkpoint.as_directory() as folder:
        info = json.loads((Path(folder) / INFO_FILE).read_text())
        state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
    return info, state


def write_checkpoint(folder: Path, session, state: dict, info: dict, with_generator: bool) -> None:
    """state: the session's `state_dict(gather=True)`, which every rank computed."""
    from components.methods.translator import save_translator

    torch.save(state, folder / STATE_FILE)
    if with_generator:
        save_translator(folder / GENERATOR_FILE, session)
    # final: the job's last epoch, with the exported generator.
    (folder / INFO_FILE).write_text(json.dumps({**info, "final": with_generator}, indent=2))
