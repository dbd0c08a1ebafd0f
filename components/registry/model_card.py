"""The description of a registered version: a model card a user reads in the MLflow UI.

What it was trained on and how, what the gate measured, and how to call it (pairgan predict,
Python, `mlflow models serve`).
"""

from collections.abc import Mapping
from dataclasses import dataclass

from components.registry.flavor import TranslatorCard
from components.tracking import TAG_GIT_COMMIT, TAG_MANIFEST_CHECKSUM

TAG_PARAMS_HASH = "pairgan.params_sha256"
TAG_METHOD = "pairgan.method"


@dataclass(frozen=True)
class Provenance:
    """Where a model came from: recorded as version tags and in its model card."""

    method: str
    model_params: Mapping[str, object]  # the generator's model params, flattened (dotted keys)
    data_manifest_checksum: str
    params_sha256: str  # of every params file, names and bytes
    git_commit: str | None

    def tags(self) -> dict[str, str]:
        tags = {
            TAG_METHOD: self.method,
            TAG_MANIFEST_CHECKSUM: self.data_manifest_checksum,
            TAG_PARAMS_HASH: self.params_sha256,
        }
        if self.git_commit:
            tags[TAG_GIT_COMMIT] = self.git_commit
        return tags


def render_model_card(
    model_name: str,
    version: str,
    card: TranslatorCard,
    provenance: Provenance,
    verified: Mapping[str, float],
    split: str,
    samples: int,
    decision: str,
    run_id: str,
) -> str:
    """Markdown for the version's description. `verified`: the gate's own scores of this version."""
    size = f"{card.channels} x {card.image_size} x {card.image_size}"
    guidance = f", classifier-free guidance w = {card.guidance_weight:g}" if card.supports_guidance else ""
    params = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(provenance.model_params.items()))
    metrics = " | ".join(f"{name} {value:.4g}" for name, value in verified.items())
    commit = provenance.git_commit or "not in a git checkout"
    return f"""# {model_name} version {version}

A **{provenance.method}** generator for paired image-to-image translation (pairgan).
Input and output: float32 N x {size} in [-1, 1]; {card.nfe} generator call(s) per image{guidance}.

## Provenance
- data manifest sha256: `{provenance.data_manifest_checksum}`
- params sha256 (every params file): `{provenance.params_sha256}`
- git commit: `{commit}`
- MLflow run: `{run_id}` (holds this model; for a model from `pairgan train`, its training curves and evaluation)

## Scores on the {split} split ({samples} images, measured by the gate on this registered model)
{metrics}

Gate decision at registration: {decision}.

## How to call it
Translate a folder of images (any size; resized to {card.image_size} px and back):

    pairgan predict --model models:/{model_name}/{version} --input my_sources/ --output translated/

Python (`mlflow.pyfunc` needs pairgan installed; nothing is unpickled):

    import mlflow, numpy as np
    model = mlflow.pyfunc.load_model("models:/{model_name}/{version}")
    images = model.predict(np.zeros((1, {card.channels}, {card.image_size}, {card.image_size}), np.float32))

Serving (in an environment with pairgan installed):

    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false mlflow models serve -m models:/{model_name}@champion --env-manager local -p 5001
    curl -X POST localhost:5001/invocations -H 'Content-Type: application/json' -d '{{"inputs": <N x {size} nested lists>}}'

## Model params
| key | value |
|---|---|
{params}
"""
