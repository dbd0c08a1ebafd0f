"""The champion/challenger gate.

A trained translator is logged to MLflow (`components.registry.flavor`), loaded back and scored
on the held-out split. The current `@champion` is loaded from the registry and scored on the
same images with the same seed: stored numbers are never trusted, the data may have changed
since it was registered. The gate then decides on the per-image scores of both
(`components.registry.comparison`): the challenger is promoted only when the confidence
interval of its mean improvement lies entirely above the margin.

Reading the champion, deciding and moving the aliases is one atomic step: the decision is
taken on the champion read before scoring, then, under the registry lock
(`components.registry.lock`), the champion is read again; if it changed meanwhile (another
register or a rollback finished first), the new champion is scored and the decision taken
again. The version is registered, its aliases set and `@champion` read back inside the lock,
so the outcome reports what the registry holds, not what this process meant to do.

Everything here takes the tracking URI and typed params; the caller resolves them and checks
that the store is reachable first.
"""

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from components.config.register import RegisterParams
from components.evaluation.held_out import HeldOutScores
from components.evaluation.report import HIGHER_IS_BETTER
from components.redaction import redact_uri
from components.registry.comparison import Comparison, paired_bootstrap, per_image_improvement
from components.registry.flavor import TranslatorCard
from components.registry.loading import UnsafeModelArtifact, load_registered
from components.registry.lock import RegistryLock
from components.registry.model_card import Provenance, render_model_card

_log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT_NAME = "translator"
# the per-image metrics every scoring computes: the gate verifies all of them and tags them
VERIFIED_METRICS = ("l1", "psnr", "ssim")
# how often the champion may change under a running gate before it gives up
MAX_ROUNDS = 3

# decisions
FIRST_CHAMPION = "first_champion"
PROMOTED = "promoted"
KEPT_CHAMPION = "kept_champion"
REPLACED_INCOMPATIBLE = "replaced_incompatible_champion"

# tags on a registered version
TAG_DECISION = "gate.decision"
TAG_REASON = "gate.reason"
TAG_PRIMARY_METRIC = "gate.primary_metric"
TAG_CHALLENGER_SCORE = "gate.challenger_score"
TAG_CHAMPION_SCORE = "gate.champion_score"
TAG_CHAMPION_VERSION = "gate.champion_version_before"
TAG_MARGIN = "gate.margin"
TAG_IMPROVEMENT = "gate.improvement"
TAG_INTERVAL_LOW = "gate.interval_low"
TAG_INTERVAL_HIGH = "gate.interval_high"
TAG_CONFIDENCE = "gate.confidence"
TAG_RESAMPLES = "gate.resamples"
TAG_SAMPLES = "gate.samples"
TAG_SPLIT = "gate.split"
METRIC_TAG_PREFIX = "metric."
# on the MLflow run that holds the model
TAG_REGISTERED_VERSION = "pairgan.registered_version"


class RegistrationRefused(RuntimeError):
    """The model must not be registered (diverged training, non-finite scores); the message says why."""


class ChampionUnusable(RuntimeError):
    """The champion cannot be loaded safely or fails on data it accepts: a person must look; nothing was registered."""


@dataclass(frozen=True)
class ChampionScored:
    version: str
    scores: HeldOutScores


@dataclass(frozen=True)
class ChampionIncompatible:
    """The champion's declared input differs from the current data (e.g. image_size changed)."""

    version: str
    reason: str


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    decision: str  # first_champion | promoted | kept_champion | replaced_incompatible_champion
    reason: str  # the rule that applied, in words
    primary_metric: str
    higher_is_better: bool
    margin: float
    challenger_score: float
    champion_score: float | None
    champion_version_before: str | None
    comparison: Comparison | None  # None when there was no champion to compare with


@dataclass(frozen=True)
class RegistrationOutcome:
    model_name: str
    version: str
    model_uri: str
    run_id: str
    champion_version_after: str | None  # read back from the registry after the aliases were set
    verified: dict[str, float]  # the gate's own means of the registered model
    samples: int
    gate: GateDecision

    @property
    def promoted(self) -> bool:
        """What the registry holds now, not what the gate meant to do."""
        return self.champion_version_after == self.version

    def report(self) -> dict:
        """The DVC metrics file's content (reports/register.json)."""
        comparison = self.gate.comparison
        gate = {key: value for key, value in asdict(self.gate).items() if key not in {"comparison", "promoted"}}
        return {
            "model_name": self.model_name,
            "version": int(self.version),
            "model_uri": self.model_uri,
            "run_id": self.run_id,
            "champion_version": int(self.champion_version_after) if self.champion_version_after else None,
            "promoted": self.promoted,
            **gate,
            "improvement": comparison.mean_improvement if comparison else None,
            "interval_low": comparison.interval_low if comparison else None,
            "interval_high": comparison.interval_high if comparison else None,
            "confidence": comparison.confidence if comparison else None,
            "resamples": comparison.resamples if comparison else None,
            "samples": self.samples,
            "scores": self.verified,
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


def decide(params: RegisterParams, challenger: HeldOutScores, champion: ChampionScored | ChampionIncompatible | None) -> GateDecision:
    """The gate's rule: `champion` is the scored champion, one the data does not fit, or None (no champion yet)."""
    metric = params.primary_metric
    common = {
        "primary_metric": metric,
        "higher_is_better": HIGHER_IS_BETTER[metric],
        "margin": params.margin,
        "challenger_score": challenger.means[metric],
    }
    if champion is None:
        return GateDecision(
            promoted=True, decision=FIRST_CHAMPION, reason="no champion yet: the first registered model becomes champion",
            champion_score=None, champion_version_before=None, comparison=None, **common,
        )
    if isinstance(champion, ChampionIncompatible):
        return GateDecision(
            promoted=True, decision=REPLACED_INCOMPATIBLE,
            reason=f"{champion.reason}: it cannot be scored on the current data, so the challenger replaces it",
            champion_score=None, champion_version_before=champion.version, comparison=None, **common,
        )
    improvement = per_image_improvement(challenger.per_image, champion.scores.per_image, metric, HIGHER_IS_BETTER[metric])
    comparison = paired_bootstrap(
        improvement, metric, resamples=params.bootstrap_resamples, confidence=params.confidence, seed=params.bootstrap_seed
    )
    promoted = comparison.above(params.margin)
    where = "entirely above" if promoted else "not entirely above"
    return GateDecision(
        promoted=promoted, decision=PROMOTED if promoted else KEPT_CHAMPION,
        reason=f"{comparison.describe()}, {where} the margin {params.margin:g}",
        champion_score=champion.scores.means[metric], champion_version_before=champion.version,
        comparison=comparison, **common,
    )


def current_champion_version(client, model_name: str) -> str | None:
    """The version number behind `@champion`, or None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException as error:
        # both "no such registered model" and "no such alias" mean: no champion yet
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}:
            return None
        raise


def _log_translator(client, tracking_uri: str, experiment: str, translator: nn.Module, card: TranslatorCard, run_id: str | None) -> tuple[str, str, bool]:
    """Log the translator (pt2 + pyfunc entry) to the training run, or to a new run; (model URI, run id, created)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from components.registry import flavor
    from components.tracking import ensure_experiment

    run = None
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            # e.g. training logged to another store: keep the model, lose only the link to its curves
            _log.warning("MLflow run %s is not in %s; logging the model to a new run", run_id, redact_uri(tracking_uri))
    created = run is None
    if created:
        run = client.create_run(ensure_experiment(client, tracking_uri, experiment), run_name="register")
    run_id = run.info.run_id
    mlflow.set_tracking_uri(tracking_uri)  # Model.log resolves the store from the global URI
    try:
        # created here so that it lands in the run's experiment (MLflow would pick the default one)
        # and carries the run's params (the training config) for the UI
        logged_model = client.create_logged_model(
            run.info.experiment_id, name=MODEL_ARTIFACT_NAME, source_run_id=run_id, params=dict(run.data.params)
        )
        logged = Model.log(
            artifact_path=None, name=MODEL_ARTIFACT_NAME, flavor=flavor, run_id=run_id,
            model_id=logged_model.model_id, translator=translator, card=card,
        )
    except Exception as error:  # torch.export failures come as many types; all mean "not loggable"
        if created:  # a training run stays FINISHED: its training did not fail
            client.set_terminated(run_id, "FAILED")
        raise RegistrationRefused(
            f"the generator could not be logged to MLflow in the pt2 (torch.export) format: "
            f"{type(error).__name__}: {error}"
        ) from error
    return logged.model_uri, run_id, created


def _assess_champion(
    version: str, tracking_uri: str, params: RegisterParams, card: TranslatorCard,
    score: Callable[[nn.Module], HeldOutScores], device: torch.device,
) -> ChampionScored | ChampionIncompatible:
    from mlflow.exceptions import MlflowException

    name = f"{params.model_name} version {version}"
    advice = (
        f"nothing was registered. Move @{CHAMPION} to a sound version with "
        f"`pairgan rollback --to VERSION --reason ...`, then run again"
    )
    try:
        loaded = load_registered(f"models:/{params.model_name}/{version}", tracking_uri, device)
    except UnsafeModelArtifact as error:
        raise ChampionUnusable(f"the champion, {name}, is not a model pairgan wrote and was not loaded ({error}); {advice}") from None
    except MlflowException as error:
        raise ChampionUnusable(f"the champion, {name}, cannot be downloaded ({error.message}); {advice}") from None
    theirs, ours = loaded.card, card
    if (theirs.channels, theirs.image_size) != (ours.channels, ours.image_size):
        return ChampionIncompatible(
            version,
            f"the champion, {name}, takes {theirs.channels} x {theirs.image_size} x {theirs.image_size} images "
            f"and the current data is {ours.channels} x {ours.image_size} x {ours.image_size}",
        )
    try:
        scores = score(loaded.module)
    except Exception as error:  # anything a foreign graph raises on data it declares it accepts
        raise ChampionUnusable(f"the champion, {name}, failed on the held-out split ({type(error).__name__}: {error}); {advice}") from error
    if not scores.finite:
        raise ChampionUnusable(f"the champion, {name}, gives non-finite scores on the held-out split ({scores.means}); {advice}")
    return ChampionScored(version, scores)


def _version_tags(provenance: Provenance, verified: Mapping[str, float], card: TranslatorCard, gate: GateDecision, split: str, samples: int) -> dict[str, str]:
    comparison = gate.comparison
    tags = {
        **provenance.tags(),
        **{f"{METRIC_TAG_PREFIX}{name}": f"{value:.6g}" for name, value in verified.items()},
        f"{METRIC_TAG_PREFIX}nfe": str(card.nfe),
        TAG_DECISION: gate.decision,
        TAG_REASON: gate.reason[:5000],
        TAG_PRIMARY_METRIC: gate.primary_metric,
        TAG_MARGIN: f"{gate.margin:g}",
        TAG_CHALLENGER_SCORE: f"{gate.challenger_score:.6g}",
        TAG_CHAMPION_SCORE: "none" if gate.champion_score is None else f"{gate.champion_score:.6g}",
        TAG_CHAMPION_VERSION: gate.champion_version_before or "none",
        TAG_SPLIT: split,
        TAG_SAMPLES: str(samples),
    }
    if comparison is not None:
        tags.update({
            TAG_IMPROVEMENT: f"{comparison.mean_improvement:.6g}",
            TAG_INTERVAL_LOW: f"{comparison.interval_low:.6g}",
            TAG_INTERVAL_HIGH: f"{comparison.interval_high:.6g}",
            TAG_CONFIDENCE: f"{comparison.confidence:g}",
            TAG_RESAMPLES: str(comparison.resamples),
        })
    return tags


def register_with_gate(
    tracking_uri: str,
    params: RegisterParams,
    translator: nn.Module,
    card: TranslatorCard,
    score: Callable[[nn.Module], HeldOutScores],
    device: torch.device,
    provenance: Provenance,
    *,
    split: str = "test",
    run_id: str | None = None,
) -> RegistrationOutcome:
    """Log `translator`, score it and the champion with `score`, register it and apply the gate.

    `score(module) -> HeldOutScores` evaluates a module on the held-out split (per image and
    mean); it is called on the modules loaded back from MLflow, so a model that does not load
    and run is never registered. `run_id` is the training run, which receives the model (a new
    run in `params.experiment` when it is None or not in this store). Raises
    RegistrationRefused (nothing registered), ChampionUnusable (nothing registered),
    RegistryBusy or LockLost (nothing changed in the registry).
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    model_uri, run_id, created_run = _log_translator(client, tracking_uri, params.experiment, translator, card, run_id)
    try:
        challenger = score(load_registered(model_uri, tracking_uri, device).module)
    except BaseException as error:
        if created_run:
            client.set_terminated(run_id, "FAILED")
        if isinstance(error, UnsafeModelArtifact):  # what was just logged fails our own format check
            raise RegistrationRefused(f"the logged model does not load back: {error}") from error
        raise
    if created_run:
        client.set_terminated(run_id, "FINISHED")
    if not challenger.finite:
        raise RegistrationRefused(f"the logged model's scores are not finite ({challenger.means}); the model is not registered")
    verified = {name: challenger.means[name] for name in VERIFIED_METRICS}
    samples = len(challenger.per_image)

    assessed: dict[str, ChampionScored | ChampionIncompatible] = {}
    for _ in range(MAX_ROUNDS):
        before = current_champion_version(client, params.model_name)
        if before is not None and before not in assessed:
            assessed[before] = _assess_champion(before, tracking_uri, params, card, score, device)
        gate = decide(params, challenger, assessed.get(before) if before is not None else None)
        with RegistryLock(client, params.model_name, wait_s=params.lock_timeout_s) as lock:
            now = current_champion_version(client, params.model_name)
            if now != before:
                _log.info("@%s moved from version %s to %s while this gate ran: deciding again", CHAMPION, before, now)
                continue
            lock.confirm()
            mlflow.set_tracking_uri(tracking_uri)
            version = str(mlflow.register_model(model_uri, params.model_name, tags=_version_tags(provenance, verified, card, gate, split, samples)).version)
            client.set_registered_model_alias(params.model_name, CHALLENGER, version)
            if gate.promoted:
                client.set_registered_model_alias(params.model_name, CHAMPION, version)
            after = current_champion_version(client, params.model_name)
            client.update_model_version(
                params.model_name, version,
                description=render_model_card(params.model_name, version, card, provenance, verified, split, samples, gate.decision, run_id),
            )
            client.set_tag(run_id, TAG_REGISTERED_VERSION, version)
        outcome = RegistrationOutcome(params.model_name, version, model_uri, run_id, after, verified, samples, gate)
        if outcome.promoted != gate.promoted:
            _log.warning("@%s is version %s, not what this gate set: it was changed outside pairgan", CHAMPION, after)
        return outcome
    raise RegistrationRefused(
        f"@{CHAMPION} of {params.model_name} changed {MAX_ROUNDS} times while this gate ran; nothing was registered. Run again"
    )
