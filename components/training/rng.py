"""Every random number generator's state as plain tensors and numbers (loadable with weights_only=True)."""

import random

import numpy as np
import torch


def capture_rng() -> dict:
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": {
            "version": python_state[0],
            "state": torch.tensor(python_state[1], dtype=torch.int64),
            "gauss_next": python_state[2],
        },
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        # One state per GPU the saving process saw: Ray shows each worker every GPU its node's
        # workers hold, so a run resumed on a node with fewer GPUs has fewer to restore. Each
        # step reseeds every device (`step_seed`), so the states of GPUs that are gone matter
        # to nothing that follows.
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.cpu(), index)
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"]))
