"""One retraining cycle: the work of `pairgan retrain`, the command every scheduler runs.

    lock the state -> restore it (dvc.lock, reports, `dvc pull`) -> compare the source with the
    data set -> nothing new: say so, stop -> else `dvc repro` (prepare appends, train, evaluate,
    register with the gate) -> `dvc push`, store the new state -> summary, MLflow tags

- One cycle at a time, on any number of machines: the lock of the state's location
  (components/locks.py: a file lock beside a local folder, a conditional-put lock object with
  an expiry beside an s3:// prefix). A second cycle stops at once, naming the holder.
- The state (components/retraining/state.py) is committed in one write at the very end: a
  cycle that dies anywhere leaves the previous state, and the next cycle restores it and does
  the work again. DVC's outputs are content-addressed and `prepare` is deterministic, so the
  redone work gives the same data set; training resumes from its checkpoints.
- The champion alias moves only inside `register`'s gate, atomically: a cycle that dies before
  it leaves the champion where it was.
- `start_from: champion`: the networks start from the weights the current champion was trained
  to, kept in the state when a cycle promoted it (a champion promoted by hand has none: the
  cycle trains from random weights and the summary says why).
"""

import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from components.atomic_files import write_json_atomic
from components.config.data import DataParams
from components.config.model import ModelParams
from components.config.retrain import RetrainParams
from components.console import StepProgress
from components.data.manifest import ManifestError, load_manifest
from components.data.sources import SourceError
from components.locks import LockLost, exclusive_lock
from components.object_store import ObjectStoreError, download_file, is_s3_uri, join_s3_uri, s3_client
from components.redaction import redact_text
from components.retraining.dvc_commands import (
    LOCK_FILE,
    DvcFailed,
    checked,
    dvc,
    locked_stages,
    remote_location,
    stale_stages,
    uncached_outputs,
    use_remote_url,
)
from components.retraining.source_changes import SourceChanges, find_source_changes
from components.retraining.state import CURRENT, STATE_FOLDER
from components.stored_folder import StoredFolder, join_location
from components.training.checkpoints import STATE_FILE
from components.training.warm_start import read_start_weights, start_weights_mismatch, write_start_weights

log = logging.getLogger(__name__)

PURPOSE = "pairgan retrain"
# The pipeline's files a cycle reads (dvc.yaml's paths)
PREPARED = "data/prepared"
TRAIN_INFO = "reports/train_info.json"
REGISTER_REPORT = "reports/register.json"
PREPARE_REPORT = "reports/prepare.json"
# the environment variable `pairgan train` reads its start weights from (pipelines/environment.py)
START_WEIGHTS_VARIABLE = "PAIRGAN_START_WEIGHTS"
# tags on the training run of a cycle that trained
TAG_PREFIX = "pairgan.retrain."

Outcome = Literal["nothing_new", "done", "diverged", "failed"]


class RetrainFailed(RuntimeError):
    """The cycle stopped; the message says where and why. The stored state is the previous one."""


@dataclass(frozen=True)
class RetrainSetup:
    """What a cycle works with, resolved by the stage."""

    project: Path  # the checkout holding dvc.yaml (the working directory)
    params: RetrainParams
    data: DataParams  # params/data.yaml: the source the cycle compares
    model: ModelParams  # params/model.yaml with the data's sizes: what start weights must fit
    model_name: str  # params/register.yaml: the registered model whose champion counts
    storage_path: str  # params/train.yaml run.storage_path as the workers see it (absolute or s3://)
    tracking_uri: str
    remote_url: str | None = None  # PAIRGAN_DVC_REMOTE_URL: the remote's URL for this checkout
    progress: StepProgress | None = None


@dataclass
class RetrainResult:
    outcome: Outcome
    summary: dict = field(default_factory=dict)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _versions(project: Path) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in ("pairgan", "dvc", "ray", "mlflow", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True)
    versions["git_commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    return versions


def _champion_version(tracking_uri: str, model_name: str) -> str | None:
    from mlflow import MlflowClient

    from components.registry.gate import current_champion_version

    return current_champion_version(MlflowClient(tracking_uri=tracking_uri), model_name)


def _weights_name(model_name: str, version: str) -> str:
    return f"champions/{model_name}/v{version}.pt"


class _Cycle:
    def __init__(self, setup: RetrainSetup, store: StoredFolder):
        self.setup, self.store, self.project = setup, store, setup.project
        self.summary: dict[str, Any] = {"started": _now(), "state": store.location}

    # --- state ------------------------------------------------------------------------------
    def restore(self) -> dict | None:
        """Bring the checkout to the stored state; returns it (None before the first cycle)."""
        current = self.store.read_json(CURRENT)
        if current is None:
            log.info("no state in %s yet: this is the first cycle", self.store.location)
            return None
        folder = f"runs/{current['run']}"
        log.info("restoring the state of cycle %s (%s)", current["run"], current.get("committed"))
        self.store.download(f"{folder}/{LOCK_FILE}", self.project / LOCK_FILE)
        for relative in current["files"]:
            self.store.download(f"{folder}/files/{relative}", self.project / relative)
        checked(self.project, "pull", "--force")  # the outputs dvc.lock names, from the remote
        return current

    def commit(self, fingerprints: dict, summary: dict) -> str:
        """Store dvc.lock, the uncached outputs, the fingerprints and the summary; `current.json` last."""
        run = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        folder = f"runs/{run}"
        files = [relative for relative in uncached_outputs(self.project) if (self.project / relative).is_file()]
        for relative in files:
            self.store.upload(self.project / relative, f"{folder}/files/{relative}")
        self.store.write_json(f"{folder}/source.json", fingerprints)
        self.store.write_json(f"{folder}/retrain.json", summary)
        self.store.upload(self.project / LOCK_FILE, f"{folder}/{LOCK_FILE}")
        self.store.write_json(CURRENT, {"run": run, "files": files, "committed": _now()})  # the commit point
        return run

    # --- start weights ----------------------------------------------------------------------
    def start_weights(self) -> str | None:
        """Where the champion's networks are, when the params ask to start from them and they fit."""
        setup = self.setup
        decision = {"requested": setup.params.start_from}
        self.summary["start_from"] = decision
        if setup.params.start_from == "scratch":
            decision["used"] = "scratch"
            return None
        version = _champion_version(setup.tracking_uri, setup.model_name)
        reason = None
        location = None
        if version is None:
            reason = f"{setup.model_name} has no champion yet"
        elif not self.store.exists(_weights_name(setup.model_name, version)):
            reason = (f"the champion, version {version}, has no start weights in the state (only versions "
                      "promoted by pairgan retrain have them)")
        else:
            location = self.store.address(_weights_name(setup.model_name, version))
            mismatch = start_weights_mismatch(read_start_weights(location, self._client()), setup.model)
            if mismatch:
                reason = f"the champion, version {version}, has other model params ({', '.join(mismatch)})"
                location = None
        if location is None:
            log.warning("start_from: champion, but %s: training from random weights", reason)
            decision.update(used="scratch", reason=reason)
            return None
        log.info("the networks start from the champion's, version %s (%s)", version, location)
        decision.update(used="champion", champion_version=version, weights=location)
        return location

    def _client(self) -> Any:
        return self.store.client if is_s3_uri(self.store.location) else None

    def keep_champion_weights(self, train_info: dict, register: dict) -> None:
        """The networks a newly promoted version was trained to, for later cycles to start from."""
        checkpoint = train_info.get("checkpoint")
        if not register.get("promoted") or not checkpoint:
            return
        storage = self.setup.storage_path
        # Ray names a checkpoint on S3 without its scheme (bucket/key)
        location = f"s3://{checkpoint}" if is_s3_uri(storage) and not is_s3_uri(checkpoint) else checkpoint
        with tempfile.TemporaryDirectory(prefix="pairgan-champion-") as folder:
            local = Path(folder)
            if is_s3_uri(location):
                download_file(s3_client(), join_s3_uri(location, STATE_FILE), local / STATE_FILE)
                checkpoint_folder = local
            else:
                checkpoint_folder = Path(location)
            write_start_weights(checkpoint_folder, local / "weights.pt")
            self.store.upload(local / "weights.pt", _weights_name(register["model_name"], str(register["version"])))

    # --- the cycle --------------------------------------------------------------------------
    def compare(self, known: dict) -> SourceChanges | None:
        data, project = self.setup.data, self.project
        source = data.source.path
        if data.source.kind != "builtin" and not is_s3_uri(source or "") and not (project / source).is_dir():
            # e.g. data/builtin before the builtin_data stage first made it: the pipeline will
            log.info("source %s does not exist yet; the pipeline makes it", source)
            return None
        try:
            manifest = load_manifest(project / PREPARED) if (project / PREPARED / "manifest.json").exists() else None
        except ManifestError as error:
            raise RetrainFailed(f"the prepared data set cannot be read: {error}") from None
        try:
            changes = find_source_changes(data, project, manifest, known, self.setup.progress)
        except (SourceError, OSError) as error:
            raise RetrainFailed(f"the source cannot be read: {error}") from None
        self.summary["source"] = changes.summary()
        log.info("source %s: %d pairs, %d new %s, %d changed (%d files read)", changes.source, changes.pairs,
                 changes.new_count, changes.summary()["new_pairs"], len(changes.changed_pairs), changes.files_read)
        return changes

    def run(self) -> RetrainResult:
        setup, project, summary = self.setup, self.project, self.summary
        current = self.restore()
        known = (self.store.read_json(f"runs/{current['run']}/source.json") or {}) if current else {}
        summary["state_before"] = current["run"] if current else None
        changes = self.compare(known)
        stale = stale_stages(project)
        summary["stale_stages"] = stale
        new = changes is None or changes.new_count > 0 or (changes.changed_pairs and setup.data.mode == "overwrite")
        if current is not None and not new and not stale:
            log.info("nothing new: the source holds no pair the data set lacks, and the pipeline is up to date")
            summary.update(outcome="nothing_new", stages_run=[])
            if changes is not None and changes.fingerprints != known:
                self.commit(changes.fingerprints, summary)  # the next check need not read these files again
            return RetrainResult("nothing_new", summary)

        environment = dict(os.environ)
        environment.pop(START_WEIGHTS_VARIABLE, None)
        weights = self.start_weights()
        if weights is not None:
            environment[START_WEIGHTS_VARIABLE] = weights
        before, train_info_before = locked_stages(project), _file_digest(project / TRAIN_INFO)
        summary["champion_before"] = _champion_version(setup.tracking_uri, setup.model_name)
        log.info("running the pipeline (dvc repro): stages out of date: %s", ", ".join(stale) or "none")
        repro = dvc(project, "repro", environment=environment)
        after = locked_stages(project)
        summary["stages_run"] = [name for name in after if after.get(name) != before.get(name)]
        train_info = _read_json(project / TRAIN_INFO) or {}
        trained_now = _file_digest(project / TRAIN_INFO) != train_info_before
        if repro.returncode != 0:
            diverged = trained_now and train_info.get("status") == "diverged"
            summary.update(outcome="diverged" if diverged else "failed",
                           reason=(f"training diverged: {train_info.get('divergence_reason')}" if diverged
                                   else f"`dvc repro` failed (exit status {repro.returncode}); see its output above"))
            if trained_now:
                summary["mlflow_run_id"] = train_info.get("mlflow_run_id")
            return RetrainResult(summary["outcome"], summary)

        register = _read_json(project / REGISTER_REPORT) or {}
        prepare = _read_json(project / PREPARE_REPORT) or {}
        summary.update(
            outcome="done",
            new_pairs_added=prepare.get("new_pairs"),
            data_manifest_checksum=prepare.get("manifest_checksum") or train_info.get("data_checksum"),
            mlflow_run_id=train_info.get("mlflow_run_id"),
            gate={key: register.get(key) for key in ("decision", "reason", "model_name", "version", "promoted",
                                                     "champion_version", "improvement", "interval_low",
                                                     "interval_high", "margin", "primary_metric")},
        )
        if "register" in summary["stages_run"]:
            self.keep_champion_weights(train_info, register)
        log.info("pushing the outputs to the DVC remote")
        checked(project, "push")
        summary["finished"] = _now()
        summary["state_after"] = self.commit(changes.fingerprints if changes else {}, summary)
        return RetrainResult("done", summary)


def retrain(setup: RetrainSetup) -> RetrainResult:
    """Run one cycle under the state's lock; a cycle that fails returns outcome "failed" with the reason.

    Raises LockHeld when another cycle holds the lock (nothing was done), DvcFailed or
    ObjectStoreError when the remote cannot be named or reached (before the lock).
    """
    project = setup.project
    if setup.remote_url:
        use_remote_url(project, setup.params.remote or "store", setup.remote_url)
    name, url = remote_location(project, setup.params.remote)
    store = StoredFolder(join_location(url, STATE_FOLDER))
    started = time.perf_counter()
    with exclusive_lock(store.location, PURPOSE, ttl_s=setup.params.lock_ttl_s) as lock:
        cycle = _Cycle(setup, store)
        cycle.summary.update(remote=name, versions=_versions(project))
        try:
            result = cycle.run()
            lock.check()
        except (RetrainFailed, DvcFailed, LockLost, ObjectStoreError) as error:
            cycle.summary.update(outcome="failed", reason=redact_text(str(error)))
            result = RetrainResult("failed", cycle.summary)
    result.summary["seconds"] = round(time.perf_counter() - started, 1)
    return result


def write_summary(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, summary, indent=1)


def tag_training_run(tracking_uri: str, summary: dict) -> None:
    """The cycle's summary on the MLflow run it trained: tags, and the whole summary as an artifact."""
    from mlflow import MlflowClient

    run_id = summary.get("mlflow_run_id")
    if not run_id:
        return
    client = MlflowClient(tracking_uri=tracking_uri)
    gate = summary.get("gate") or {}
    tags = {
        "outcome": summary.get("outcome"),
        "started": summary.get("started"),
        "new_pairs": (summary.get("source") or {}).get("new_pairs_total"),
        "stages_run": ",".join(summary.get("stages_run") or []),
        "start_from": (summary.get("start_from") or {}).get("used"),
        "decision": gate.get("decision"),
        "state": summary.get("state_after"),
    }
    for key, value in tags.items():
        if value is not None:
            client.set_tag(run_id, TAG_PREFIX + key, str(value)[:5000])
    with tempfile.TemporaryDirectory(prefix="pairgan-retrain-") as folder:
        path = Path(folder) / "retrain.json"
        path.write_text(json.dumps(summary, indent=1, sort_keys=True))
        client.log_artifact(run_id, str(path), artifact_path="retrain")
