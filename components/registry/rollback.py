"""Moving `@champion` back to an earlier version, on purpose, with the reason on record.

Only a sound version can be restored: one the gate registered (it carries the gate's tags and
finite scores), whose MLflow run did not end diverged or failed, and whose artifact is still
a pt2 translator that loads (`components.registry.loading`). The move happens under the
registry lock, like the gate's, and is recorded three ways: tags on the restored version and
on the version it replaces, an MLflow run named `rollback vA -> vB` in the registry's
experiment (its tags hold the reason), and the returned outcome (the stage writes it as a report).
"""

import getpass
import math
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch

from components.config.register import RegisterParams
from components.registry.gate import CHAMPION, TAG_CHALLENGER_SCORE, TAG_DECISION, current_champion_version
from components.registry.loading import UnsafeModelArtifact, load_registered
from components.registry.lock import RegistryLock
from components.tracking import TAG_DIVERGED, TAG_OUTCOME, ensure_experiment

# on the restored version
TAG_RESTORED_AT, TAG_RESTORED_REASON, TAG_RESTORED_FROM = "rollback.restored_at", "rollback.restored_reason", "rollback.restored_from"
# on the version it replaced
TAG_REPLACED_AT, TAG_REPLACED_REASON, TAG_REPLACED_BY = "rollback.replaced_at", "rollback.replaced_reason", "rollback.replaced_by"
UNSOUND_OUTCOMES = {"diverged", "failed"}


class RollbackRefused(RuntimeError):
    """The version cannot become champion; the message says why. Nothing was changed."""


@dataclass(frozen=True)
class RollbackOutcome:
    model_name: str
    champion_version_before: str | None
    champion_version: str | None  # read back after the move
    requested_version: str
    reason: str
    at: str  # UTC, ISO 8601
    by: str  # user@host that ran it
    run_id: str | None  # the MLflow run recording it; None when nothing had to change

    @property
    def changed(self) -> bool:
        return self.champion_version_before != self.champion_version

    def report(self) -> dict:
        return {**asdict(self), "changed": self.changed}


def _unsound_because(client, model_name: str, version) -> str | None:
    """Why a version was never a sound model, or None when it was."""
    from mlflow.exceptions import MlflowException

    tags = version.tags or {}
    if TAG_DECISION not in tags:
        return "it was not registered by pairgan's gate (it has no gate.decision tag)"
    try:
        score = float(tags.get(TAG_CHALLENGER_SCORE, "nan"))
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        return f"its gate score is {tags.get(TAG_CHALLENGER_SCORE)!r}, not a finite number"
    if version.run_id:
        try:
            run = client.get_run(version.run_id)
        except MlflowException:
            return None  # the run was deleted: its gate tags still say it was sound
        outcome = run.data.tags.get(TAG_OUTCOME)
        if outcome in UNSOUND_OUTCOMES or run.data.tags.get(TAG_DIVERGED) == "true":
            return f"its training run {version.run_id} ended {outcome}"
    return None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        return "unknown"


def roll_back(tracking_uri: str, params: RegisterParams, to_version: str, reason: str, device: torch.device) -> RollbackOutcome:
    """Move `@champion` of `params.model_name` to `to_version`, recording `reason`. Raises RollbackRefused."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    reason = reason.strip()
    if not reason:
        raise RollbackRefused("a reason is required: it is recorded on the versions and in MLflow")
    name = params.model_name
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        version = client.get_model_version(name, to_version)
    except MlflowException:
        versions = sorted(int(found.version) for found in client.search_model_versions(f"name='{name}'"))
        known = ", ".join(map(str, versions)) if versions else "none: nothing is registered under that name"
        raise RollbackRefused(f"{name} has no version {to_version} (versions: {known})") from None
    why = _unsound_because(client, name, version)
    if why:
        raise RollbackRefused(f"{name} version {to_version} was never a sound model: {why}")
    try:
        # the artifact itself: still a pt2 translator that loads (not replaced, not deleted)
        load_registered(f"models:/{name}/{to_version}", tracking_uri, device)
    except UnsafeModelArtifact as error:
        raise RollbackRefused(f"{name} version {to_version} cannot be restored: {error}") from None
    except MlflowException as error:
        raise RollbackRefused(f"{name} version {to_version} cannot be downloaded: {error.message}") from None

    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    by = f"{_user()}@{socket.gethostname()}"
    with RegistryLock(client, name, wait_s=params.lock_timeout_s) as lock:
        before = current_champion_version(client, name)
        if before == to_version:
            return RollbackOutcome(name, before, before, to_version, reason, at, by, None)
        lock.confirm()
        run = client.create_run(
            ensure_experiment(client, tracking_uri, params.experiment),
            run_name=f"rollback v{before or 'none'} -> v{to_version}",
            tags={
                "pairgan.rollback.model": name,
                "pairgan.rollback.from_version": before or "none",
                "pairgan.rollback.to_version": to_version,
                "pairgan.rollback.reason": reason[:5000],
                "pairgan.rollback.by": by,
            },
        )
        client.set_registered_model_alias(name, CHAMPION, to_version)
        after = current_champion_version(client, name)
        for key, value in {TAG_RESTORED_AT: at, TAG_RESTORED_REASON: reason[:5000], TAG_RESTORED_FROM: before or "none"}.items():
            client.set_model_version_tag(name, to_version, key, value)
        if before is not None:
            for key, value in {TAG_REPLACED_AT: at, TAG_REPLACED_REASON: reason[:5000], TAG_REPLACED_BY: to_version}.items():
                client.set_model_version_tag(name, before, key, value)
        client.set_terminated(run.info.run_id, "FINISHED")
    return RollbackOutcome(name, before, after, to_version, reason, at, by, run.info.run_id)
