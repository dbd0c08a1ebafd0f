"""Stage register: log the generator to MLflow, register it as `challenger`, and gate `champion`.

The gate scores the new model and the current champion, both loaded back from MLflow, on the
same held-out split with the same seed, and moves `champion` only when params/register.yaml's
primary metric improves by more than its margin; the first model becomes champion. The
decision and both scores go to --out (a DVC metrics file) and onto the version's tags. A
diverged or NaN run is refused before anything is logged. The tracking store is
MLFLOW_TRACKING_URI, else sqlite:///<working dir>/mlflow.db; an unreachable one fails first.
"""

import argparse
import hashlib
import logging
import sys
from pathlib import Path

from components.atomic_files import write_json_atomic
from components.config import ParamsError, load_params
from components.config.data import READS_SHARDS_ONLY, DataParams
from components.config.evaluate import EvaluateParams
from components.config.register import RegisterParams
from components.data.loaders import make_loader
from components.data.manifest import load_manifest
from components.evaluation.features import FeaturesUnavailable, load_inception
from components.evaluation.held_out import pick_device, score_held_out
from components.evaluation.report import GRID_FILE, METRICS_FILE, read_evaluation
from components.methods.translator import load_translator
from components.redaction import redact_uri
from components.registry import (
    ChampionUnscoreable,
    RegistrationRefused,
    TranslatorCard,
    refuse_unless_healthy,
    register_with_gate,
)
from components.tracking import (
    TAG_GIT_COMMIT,
    TAG_MANIFEST_CHECKSUM,
    TrackingUnavailable,
    check_tracking_reachable,
    git_commit,
)
from components.training.report import read_train_report
from pipelines import environment
from pipelines.exit_status import ExitStatus

log = logging.getLogger(__name__)

TAG_PARAMS_HASH = "pairgan.params_sha256"
# the feature-based metrics need the Inception extractor in the gate as well
FEATURE_METRICS = {"fid", "kid"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default="data/prepared", help="prepared data set: folder with manifest.json, or s3://bucket/prefix"
    )
    parser.add_argument("--model", default="models/generator.pt", help="the trained generator (train stage)")
    parser.add_argument("--train-report", default="reports/train.json", help="train stage report")
    parser.add_argument("--evaluation", default="reports/evaluate", help="evaluate stage output folder")
    parser.add_argument("--out", default="reports/register.json", help="gate decision and scores (DVC metrics)")


def params_hash(params_dir: Path) -> str:
    """SHA-256 over every params file (name and bytes): which configuration produced this model."""
    digest = hashlib.sha256()
    for path in sorted(params_dir.glob("*.yaml")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run(args: argparse.Namespace) -> int:
    params_dir = Path(args.params_dir)
    register_path = params_dir / "register.yaml"
    params = load_params(register_path, RegisterParams)
    evaluate_params = load_params(params_dir / "evaluate.yaml", EvaluateParams)
    data_params = load_params(params_dir / "data.yaml", DataParams, context=READS_SHARDS_ONLY)

    try:
        train_report = read_train_report(Path(args.train_report))
        evaluation = read_evaluation(Path(args.evaluation))
    except (FileNotFoundError, ValueError) as error:
        print(f"pairgan register: {error}", file=sys.stderr)
        return ExitStatus.FAILED
    means = evaluation.scores
    if params.primary_metric not in means:
        raise ParamsError(
            register_path,
            [("primary_metric", f"{params.primary_metric} was not computed by evaluate ({evaluation.info.features.skipped})")],
        )
    try:
        refuse_unless_healthy(train_report.model_dump(), means)
    except RegistrationRefused as refusal:
        print(f"pairgan register: {refusal}", file=sys.stderr)
        return ExitStatus.FAILED

    tracking_uri = environment.tracking_uri()
    try:
        check_tracking_reachable(tracking_uri, params.experiment)
    except TrackingUnavailable as error:
        print(f"pairgan register: {error}", file=sys.stderr)
        return ExitStatus.FAILED
    log.info("MLflow: %s, registered model %r", redact_uri(tracking_uri), params.model_name)

    try:
        manifest = load_manifest(args.data)
        device = pick_device(evaluate_params.device)
        translator = load_translator(args.model, map_location="cpu").eval()
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"pairgan register: {error}", file=sys.stderr)
        return ExitStatus.FAILED
    extractor = None
    if params.primary_metric in FEATURE_METRICS:
        try:
            extractor = load_inception(evaluate_params.features.inception_weights, device)
        except FeaturesUnavailable as reason:
            raise ParamsError(register_path, [("primary_metric", f"{params.primary_metric} needs {reason}")]) from None

    def held_out():
        return make_loader(
            args.data, evaluate_params.split, data_params.loader, evaluate_params.batch_size, train=False, device=device,
            expected_checksum=manifest.checksum,
        )

    def score(module) -> float:
        scores = score_held_out(
            module, held_out(), device, seed=evaluate_params.seed, max_samples=evaluate_params.max_samples,
            extractor=extractor, features=evaluate_params.features,
        )
        return scores.means[params.primary_metric]

    try:
        # the registered graph takes exactly what the held-out loader yields (evaluation size, channels)
        example = next(iter(held_out()))["source"]
    except (ValueError, KeyError) as error:
        print(f"pairgan register: {error.args[0] if isinstance(error, KeyError) else error}", file=sys.stderr)
        return ExitStatus.FAILED
    card = TranslatorCard(
        nfe=translator.nfe,
        supports_guidance=translator.supports_guidance,
        guidance_weight=translator.guidance_weight if translator.supports_guidance else None,
        channels=example.shape[1],
        image_size=example.shape[-1],
    )
    tags = {TAG_MANIFEST_CHECKSUM: manifest.checksum, TAG_PARAMS_HASH: params_hash(params_dir), "pairgan.method": translator.method}
    commit = git_commit(Path.cwd())
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    numeric = evaluation.metrics.model_dump(exclude_unset=True)
    artifacts = [Path(args.evaluation) / name for name in (METRICS_FILE, GRID_FILE)]
    try:
        outcome = register_with_gate(
            tracking_uri, params, translator, card, score, device,
            run_id=train_report.mlflow_run_id, metrics=numeric, tags=tags, artifacts=artifacts,
        )
    except (RegistrationRefused, ChampionUnscoreable) as error:
        print(f"pairgan register: {error}", file=sys.stderr)
        return ExitStatus.FAILED

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, outcome.report(), sort_keys=False)
    gate = outcome.gate
    log.info(
        "%s version %s: %s (%s: challenger %.4g, champion %s); champion is version %s",
        outcome.model_name, outcome.version, gate.decision, gate.primary_metric, gate.challenger_score,
        "none" if gate.champion_score is None else f"{gate.champion_score:.4g}", outcome.champion_version_after,
    )
    return ExitStatus.OK
