"""Stage register: log the generator to MLflow, register it as `challenger`, and gate `champion`.

The gate scores the new model and the current champion, both loaded back from MLflow, on the
same held-out split with the same seed, and moves `champion` only when the paired bootstrap
interval of the per-image improvement of params/register.yaml's primary metric lies entirely
above its margin; the first model becomes champion, and so does a challenger whose champion
cannot take the current data (e.g. image_size changed). Deciding and moving the alias is
atomic (a registry lock): two runs at once end consistent, each report saying what happened.
The decision, the interval and the gate's own scores go to --out (a DVC metrics file) and onto
the version's tags; its description is a model card. A diverged or NaN run is refused before
anything is logged; a champion that is not a pt2 model pairgan wrote is never loaded. The
tracking store is MLFLOW_TRACKING_URI, else sqlite:///<working dir>/mlflow.db; an
unreachable one fails first.
"""

import argparse
import hashlib
import logging
import math
import sys
from pathlib import Path

from components.atomic_files import write_json_atomic
from components.config import load_params
from components.config.data import READS_SHARDS_ONLY, DataParams
from components.config.evaluate import EvaluateParams
from components.config.flatten import flatten
from components.config.register import RegisterParams
from components.data.manifest import load_manifest
from components.evaluation.report import METRICS_FILE, read_evaluation
from components.redaction import redact_text, redact_uri
from components.tracking import TrackingUnavailable, check_tracking_reachable, git_commit
from components.training.report import read_train_report
from pipelines import environment
from pipelines.exit_status import ExitStatus

log = logging.getLogger(__name__)

# evaluate's means and the gate's own scores of the same model on the same split agree to
# float noise; a larger difference means metrics.json is not this model's evaluation
_AGREEMENT = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/prepared", help="prepared data set (folder with manifest.json)")
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


def _warn_if_evaluation_disagrees(path: Path, reported: dict, verified: dict[str, float]) -> None:
    for name, value in verified.items():
        claimed = reported.get(name)
        if isinstance(claimed, int | float) and not math.isclose(claimed, value, rel_tol=_AGREEMENT, abs_tol=_AGREEMENT):
            log.warning(
                "%s says %s %.4g, the registered model scores %.4g on the same split: that report is not this "
                "model's evaluation (stale or edited); the registry records the gate's own scores",
                path, name, claimed, value,
            )


def _fail(message: str) -> int:
    print(f"pairgan register: {message}", file=sys.stderr)
    return ExitStatus.FAILED


def run(args: argparse.Namespace) -> int:
    params_dir = Path(args.params_dir)
    params = load_params(params_dir / "register.yaml", RegisterParams)
    evaluate_params = load_params(params_dir / "evaluate.yaml", EvaluateParams)
    data_params = load_params(params_dir / "data.yaml", DataParams, context=READS_SHARDS_ONLY)
    # Imported here: they load torch and MLflow (seconds), which a params error above need not wait for.
    import torch

    from components.data.loaders import make_loader
    from components.evaluation.held_out import pick_device, score_held_out
    from components.methods.translator import load_translator
    from components.registry.flavor import TranslatorCard
    from components.registry.gate import (
        ChampionUnusable,
        RegistrationRefused,
        refuse_unless_healthy,
        register_with_gate,
    )
    from components.registry.lock import LockLost, RegistryBusy
    from components.registry.model_card import Provenance

    try:
        train_report = read_train_report(Path(args.train_report))
        evaluation = read_evaluation(Path(args.evaluation))
    except (FileNotFoundError, ValueError) as error:
        return _fail(str(error))
    means = evaluation.scores
    try:
        refuse_unless_healthy(train_report.model_dump(), means)
    except RegistrationRefused as refusal:
        return _fail(str(refusal))

    tracking_uri = environment.tracking_uri()
    try:
        check_tracking_reachable(tracking_uri, params.experiment)
    except TrackingUnavailable as error:
        return _fail(str(error))
    log.info("MLflow: %s, registered model %r", redact_uri(tracking_uri), params.model_name)

    try:
        manifest = load_manifest(args.data)
        device = pick_device(evaluate_params.device)
        translator = load_translator(args.model, map_location="cpu").eval()
        # the file was just read as a generator export: its model params are plain data
        model_params = torch.load(args.model, map_location="cpu", weights_only=True)["model"]
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        return _fail(str(error))

    def held_out():
        return make_loader(
            args.data, evaluate_params.split, data_params.loader, evaluate_params.batch_size, train=False, device=device,
            expected_checksum=manifest.checksum,
        )

    def score(module):
        return score_held_out(module, held_out(), device, seed=evaluate_params.seed, max_samples=evaluate_params.max_samples)

    try:
        # the registered graph takes exactly what the held-out loader yields (evaluation size, channels)
        example = next(iter(held_out()))["source"]
    except (ValueError, KeyError) as error:
        return _fail(str(error.args[0] if isinstance(error, KeyError) else error))
    card = TranslatorCard(
        nfe=translator.nfe,
        supports_guidance=translator.supports_guidance,
        guidance_weight=translator.guidance_weight if translator.supports_guidance else None,
        channels=example.shape[1],
        image_size=example.shape[-1],
    )
    provenance = Provenance(
        method=translator.method,
        model_params=flatten(model_params),
        data_manifest_checksum=manifest.checksum,
        params_sha256=params_hash(params_dir),
        git_commit=git_commit(Path.cwd()),
    )
    try:
        outcome = register_with_gate(
            tracking_uri, params, translator, card, score, device, provenance,
            split=evaluate_params.split, run_id=train_report.mlflow_run_id,
        )
    except (RegistrationRefused, ChampionUnusable, RegistryBusy, LockLost) as error:
        return _fail(redact_text(str(error), tracking_uri))
    _warn_if_evaluation_disagrees(Path(args.evaluation) / METRICS_FILE, means, outcome.verified)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, outcome.report(), sort_keys=False)
    gate = outcome.gate
    log.info("%s version %s: %s (%s)", outcome.model_name, outcome.version, gate.decision, gate.reason)
    log.info(
        "@champion is version %s; @challenger is version %s", outcome.champion_version_after, outcome.version
    )
    return ExitStatus.OK
