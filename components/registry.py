"""MLflow model logging and the champion/challenger gate.

A trained translator is logged with `mlflow.pytorch.log_model` in the `pt2` format (torch.export:
a graph plus weights, loadable without unpickling code), registered as a new version of one
registered model, and given the alias `challenger`. The gate then scores the challenger *and*
the current `champion`, both as loaded back from the registry, on the same held-out batches
with the same seed, and moves `champion` only when the primary metric improves by more than
the margin. Stored numbers are never trusted: the held-out data may have changed since the
champion was registered.

Everything here takes the tracking URI and typed params; the caller resolves them (from
MLFLOW_TRACKING_URI or the local default) and checks the store is reachable first.
"""

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.config.register import RegisterParams
from components.evaluation.held_out import HIGHER_IS_BETTER
from components.redaction import redact_uri

_log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT_NAME = "translator"

# tags on a registered version
TAG_DECISION = "gate.decision"
TAG_PRIMARY_METRIC = "gate.primary_metric"
TAG_CHALLENGER_SCORE = "gate.challenger_score"
TAG_CHAMPION_SCORE = "gate.champion_score"
TAG_CHAMPION_VERSION = "gate.champion_version_before"
TAG_MARGIN = "gate.margin"


class RegistrationRefused(RuntimeError):
    """The model must not be registered (diverged training, non-finite scores); the message says why."""


class ChampionUnscoreable(RuntimeError):
    """The current champion cannot be loaded or run on the held-out split, so no fair comparison exists."""


@dataclass(frozen=True)
class TranslatorCard:
    """What the registry records about a translator beside its graph (MLflow model metadata)."""

    nfe: int
    supports_guidance: bool
    guidance_weight: float | None
    channels: int
    image_size: int


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    decision: str  # first_champion | promoted | kept_champion
    primary_metric: str
    higher_is_better: bool
    margin: float
    challenger_score: float
    champion_score: float | None
    champion_version_before: str | None


@dataclass(frozen=True)
class RegistrationOutcome:
    model_name: str
    version: str
    model_uri: str
    run_id: str
    champion_version_after: str
    gate: GateDecision

    def report(self) -> dict:
        """The DVC metrics file's content (reports/register.json)."""
        return {
            "model_name": self.model_name,
            "version": int(self.version),
            "model_uri": self.model_uri,
            "run_id": self.run_id,
            "champion_version": int(self.champion_version_after),
            **asdict(self.gate),
        }


def refuse_unless_healthy(train_report: Mapping, metrics: Mapping[str, float | None]) -> None:
    """Raise RegistrationRefused for a diverged run or a non-finite metric.

    `train_report` is reports/train.json (`status` "diverged" with a `divergence_reason`, and
    the end-of-training `metrics`); `metrics` are the evaluation means (None stands for a NaN
    that JSON could not hold).
    """
    if train_report.get("status") == "diverged" or train_report.get("diverged"):
        reason = train_report.get("divergence_reason") or "no reason recorded"
        raise RegistrationRefused(f"training diverged ({reason}); a diverged run is never registered")
    training = train_report.get("metrics") or {}
    bad_training = sorted(
        name for name, value in training.items() if isinstance(value, float) and not math.isfinite(value)
    )
    if bad_training:
        raise RegistrationRefused(f"training ended with non-finite {', '.join(bad_training)}; the model is not registered")
    bad = sorted(name for name, value in metrics.items() if value is None or not math.isfinite(value))
    if bad:
        raise RegistrationRefused(f"evaluation metrics are not finite: {', '.join(bad)}; the model is not registered")


def decide(primary_metric: str, margin: float, challenger_score: float, champion: tuple[str, float] | None) -> GateDecision:
    """The gate itself: `champion` is (version, score) or None when there is no champion yet."""
    higher = HIGHER_IS_BETTER[primary_metric]
    if champion is None:
        return GateDecision(True, "first_champion", primary_metric, higher, margin, challenger_score, None, None)
    version, champion_score = champion
    improvement = challenger_score - champion_score if higher else champion_score - challenger_score
    promoted = improvement > margin
    return GateDecision(
        promoted,
        "promoted" if promoted else "kept_champion",
        primary_metric,
        higher,
        margin,
        challenger_score,
        champion_score,
        version,
    )


def current_champion_version(tracking_uri: str, model_name: str) -> str | None:
    """The version number behind `@champion`, or None when the model or the alias does not exist yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException as error:
        # both "no such registered model" and "no such alias" mean: no champion yet
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def _run_exists(tracking_uri: str, run_id: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def translator_signature(card: TranslatorCard):
    """TensorSpec signature: any batch size, the channels and size the translator was trained at."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    shape = (-1, card.channels, card.image_size, card.image_size)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), shape, "source")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), shape, "image")]),
    )


def load_registered(model_uri: str, tracking_uri: str, device: torch.device) -> nn.Module:
    """A logged or registered translator as a runnable module on `device`.

    A pt2 graph records the device it was exported on inside its operations (DDGAN's
    `torch.full(..., device=source.device)` becomes `device='cpu'`), so moving the loaded
    module's weights is not enough: the graph itself is rewritten with torch.export's
    `move_to_device_pass`.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import Model
    from torch.export.passes import move_to_device_pass

    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    # load_model checks that the archive holds no pickled code before torch.export.load reads it
    module = mlflow.pytorch.load_model(str(local))
    if device.type == "cpu":
        return module
    data = Model.load(str(local)).flavors["pytorch"]["model_data"]
    return move_to_device_pass(torch.export.load(local / data / "model.pt2"), device).module()


def model_card(model_uri: str, tracking_uri: str) -> TranslatorCard:
    """The metadata logged with a translator (NFE, guidance, input size)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    metadata = mlflow.models.get_model_info(model_uri).metadata or {}
    return TranslatorCard(**metadata["pairgan"])


def register_with_gate(
    tracking_uri: str,
    params: RegisterParams,
    translator: nn.Module,
    card: TranslatorCard,
    score: Callable[[nn.Module], float],
    device: torch.device,
    *,
    run_id: str | None = None,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    artifacts: Sequence[Path] = (),
) -> RegistrationOutcome:
    """Log `translator`, score it and the champion with `score`, register it and apply the gate.

    `score(module) -> float` evaluates a module on the held-out split and returns the primary
    metric; it is called on the modules loaded back from MLflow, so a model that does not load
    and run is never registered. `run_id` continues the training run when given (one run holds
    the training curves, the evaluation and the model); otherwise a run is created in
    `params.experiment`. `metrics` and `artifacts` (files, logged under evaluation/) go to the
    run, `metrics` and `tags` onto the registered version.
    """
    import mlflow
    import mlflow.pytorch

    metrics = dict(metrics or {})
    mlflow.set_tracking_uri(tracking_uri)
    if run_id is not None and not _run_exists(tracking_uri, run_id):
        # e.g. training logged to another store: keep the model, lose only the link to its curves
        _log.warning("MLflow run %s is not in %s; logging the model to a new run", run_id, redact_uri(tracking_uri))
        run_id = None
    experiment_id = None
    if run_id is None:
        experiment = mlflow.get_experiment_by_name(params.experiment)
        experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(params.experiment)
    translator = translator.to("cpu").eval()
    # batch 2: torch.export specialises a size-1 dimension, and the batch must stay dynamic
    example = torch.zeros(2, card.channels, card.image_size, card.image_size)
    resumed = run_id is not None
    run_id = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=None if resumed else "register").info.run_id
    status = "FINISHED"
    try:
        logged = mlflow.pytorch.log_model(
            translator,
            name=MODEL_ARTIFACT_NAME,
            serialization_format="pt2",
            # A tensor example (not numpy) keeps MLflow from adding a pyfunc flavor whose
            # serving-input check cannot handle 4-D images; load with mlflow.pytorch.load_model.
            input_example=example,
            signature=translator_signature(card),
            # Stated, not inferred: inference loads the model in a subprocess (seconds per log),
            # and a pt2 graph needs only torch to run.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            metadata={"pairgan": asdict(card)},
        )
        if metrics:
            # prefixed: the training run already holds per-epoch curves under plain names
            mlflow.log_metrics({f"eval/{name}": value for name, value in metrics.items()})
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="evaluation")
    except Exception as error:  # torch.export failures come as many types; all mean "not loggable"
        # a resumed training run stays FINISHED: its training did not fail
        status = "FINISHED" if resumed else "FAILED"
        raise RegistrationRefused(
            f"the generator could not be logged to MLflow in the pt2 (torch.export) format: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        mlflow.end_run(status)

    challenger_score = score(load_registered(logged.model_uri, tracking_uri, device))
    if not math.isfinite(challenger_score):
        raise RegistrationRefused(
            f"{params.primary_metric} of the logged model is {challenger_score}; the model is not registered"
        )
    champion_version = current_champion_version(tracking_uri, params.model_name)
    champion = None
    if champion_version is not None:
        try:
            champion_module = load_registered(f"models:/{params.model_name}/{champion_version}", tracking_uri, device)
            champion_score = score(champion_module)
        except Exception as error:  # any failure to load or run it means no fair comparison
            raise ChampionUnscoreable(
                f"champion {params.model_name} version {champion_version} cannot be scored on the current "
                f"held-out split ({type(error).__name__}: {error}); remove its '{CHAMPION}' alias to let the "
                "next model become champion, or restore data that it accepts"
            ) from error
        champion = (champion_version, champion_score)
    gate = decide(params.primary_metric, params.margin, challenger_score, champion)

    version_tags = {
        **{f"metric.{name}": f"{value:.6g}" for name, value in metrics.items()},
        **(tags or {}),
        TAG_DECISION: gate.decision,
        TAG_PRIMARY_METRIC: gate.primary_metric,
        TAG_MARGIN: f"{gate.margin:g}",
        TAG_CHALLENGER_SCORE: f"{gate.challenger_score:.6g}",
        TAG_CHAMPION_SCORE: "none" if gate.champion_score is None else f"{gate.champion_score:.6g}",
        TAG_CHAMPION_VERSION: gate.champion_version_before or "none",
    }
    version = mlflow.register_model(logged.model_uri, params.model_name, tags=version_tags).version
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    client.set_registered_model_alias(params.model_name, CHALLENGER, version)
    if gate.promoted:
        client.set_registered_model_alias(params.model_name, CHAMPION, version)
    return RegistrationOutcome(
        model_name=params.model_name,
        version=str(version),
        model_uri=logged.model_uri,
        run_id=run_id,
        champion_version_after=str(version) if gate.promoted else str(champion_version),
        gate=gate,
    )
