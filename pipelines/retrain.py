"""Retrain when there is something new: the one command every scheduler runs (CronJob, systemd timer, cron).

Run in a checkout of the project. Takes the lock of the state (a second retrain, on any machine,
stops at once naming the holder), restores the state the last retrain stored on the DVC remote
(dvc.lock, the reports, `dvc pull`), compares the source of params/data.yaml with the prepared
data set, and with nothing new says so and stops. Otherwise `dvc repro` appends the new pairs,
trains (from scratch, or from the champion's weights: params/retrain.yaml start_from),
evaluates and applies the registry gate; then `dvc push` and the new state are stored for the
next retrain on any machine. Writes a JSON summary (--summary) and tags the MLflow training run
with it. The state lives under the DVC remote's URL (.dvc/config; PAIRGAN_DVC_REMOTE_URL sets
it for one checkout), in pairgan-state/. Exit status: 0 done (promoted, kept the champion, or
nothing new), 1 failed (the previous state is kept), 2 invalid params, 3 training diverged.
"""

import argparse
import logging
import sys
from pathlib import Path

from components.config import load_params
from components.config.data import DataParams
from components.config.model import load_model_params
from components.config.register import RegisterParams
from components.config.retrain import RetrainParams
from components.config.train import TrainParams
from components.console import StepProgress
from components.locks import LockError
from components.object_store import ObjectStoreError, is_s3_uri
from components.redaction import redact_text
from components.retraining.cycle import RetrainSetup, retrain, tag_training_run, write_summary
from components.retraining.dvc_commands import DvcFailed
from pipelines import environment
from pipelines.exit_status import ExitStatus

log = logging.getLogger("pairgan.retrain")

EXIT_STATUS = {"nothing_new": ExitStatus.OK, "done": ExitStatus.OK, "diverged": ExitStatus.DIVERGED,
               "failed": ExitStatus.FAILED}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary", type=Path, default=Path("reports/retrain.json"),
                        help="the JSON summary of this retrain (default: reports/retrain.json)")


def _bar(description: str, total: int):
    from tqdm import tqdm

    return tqdm(desc=description, total=total, unit="pair")


def run(args: argparse.Namespace) -> int:
    project = Path.cwd()
    if not (project / "dvc.yaml").is_file():
        print(f"pairgan retrain: {project} holds no dvc.yaml: run it in a checkout of the project", file=sys.stderr)
        return ExitStatus.BAD_PARAMS
    params_dir = Path(args.params_dir)
    params = load_params(params_dir / "retrain.yaml", RetrainParams)
    data_path = params_dir / "data.yaml"
    data = load_params(data_path, DataParams, context={"base_dir": project, "check_source_path": False})
    model = load_model_params(params_dir / "model.yaml", data, data_path)
    register = load_params(params_dir / "register.yaml", RegisterParams)
    train = load_params(params_dir / "train.yaml", TrainParams)
    storage = train.run.storage_path
    setup = RetrainSetup(
        project=project, params=params, data=data, model=model, model_name=register.model_name,
        storage_path=storage if is_s3_uri(storage) else str((project / storage).resolve()),
        tracking_uri=environment.tracking_uri(), remote_url=environment.dvc_remote_url(),
        progress=StepProgress(log, bar=_bar if sys.stderr.isatty() else None),
    )
    try:
        result = retrain(setup)
    except LockError as error:
        print(f"pairgan retrain: another retrain is running: {redact_text(str(error))}", file=sys.stderr)
        return ExitStatus.FAILED
    except (DvcFailed, ObjectStoreError) as error:
        print(f"pairgan retrain: the state's location: {redact_text(str(error))}", file=sys.stderr)
        return ExitStatus.FAILED
    write_summary(args.summary, result.summary)
    if result.outcome in {"done", "diverged", "failed"}:
        tag_training_run(setup.tracking_uri, result.summary)  # the run this cycle trained, if it got that far
    summary = result.summary
    if result.outcome == "nothing_new":
        log.info("nothing new in %s; nothing was run. Summary: %s",
                 (summary.get("source") or {}).get("source", "the source"), args.summary)
    elif result.outcome == "done":
        gate = summary.get("gate") or {}
        log.info("retrained (%s ran): %s, version %s, champion %s. Summary: %s",
                 ", ".join(summary.get("stages_run") or []) or "nothing", gate.get("decision"), gate.get("version"),
                 gate.get("champion_version"), args.summary)
    else:
        print(f"pairgan retrain: {summary.get('reason')}; the stored state is unchanged. Summary: {args.summary}",
              file=sys.stderr)
    return EXIT_STATUS[result.outcome]
