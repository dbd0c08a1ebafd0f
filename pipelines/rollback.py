"""Move @champion back to an earlier registered version and record why.

`pairgan rollback --to 3 --reason "v5 blurs night images"` points `@champion` of
params/register.yaml's `model_name` at version 3, if version 3 exists and was a sound model
(registered by the gate with finite scores, not from a diverged or failed run, its pt2 artifact
intact). The reason, time and user go onto both versions' tags and into an MLflow run named
`rollback vA -> vB`; --out gets a JSON report. It waits for a running `register` (the registry
lock). Not a DVC stage: run it by hand when a champion turns out bad. Exit status 0 when
`@champion` is the requested version afterwards, 1 when refused (nothing changed).
"""

import argparse
import logging
import sys
from pathlib import Path

from components.atomic_files import write_json_atomic
from components.config import load_params
from components.config.evaluate import EvaluateParams
from components.config.register import RegisterParams
from components.evaluation.held_out import pick_device
from components.redaction import redact_text, redact_uri
from components.registry.lock import LockLost, RegistryBusy
from components.registry.rollback import RollbackRefused, roll_back
from components.tracking import TrackingUnavailable, check_tracking_reachable
from pipelines import environment
from pipelines.exit_status import ExitStatus

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, metavar="VERSION", help="the registered version to make champion again")
    parser.add_argument("--reason", required=True, help="why (recorded on the versions and in MLflow)")
    parser.add_argument("--out", default="reports/rollback.json", help="what was done (JSON)")


def _fail(message: str) -> int:
    print(f"pairgan rollback: {message}", file=sys.stderr)
    return ExitStatus.FAILED


def run(args: argparse.Namespace) -> int:
    params_dir = Path(args.params_dir)
    params = load_params(params_dir / "register.yaml", RegisterParams)
    # the version is loaded on the evaluation device once, to prove its artifact still works
    evaluate_params = load_params(params_dir / "evaluate.yaml", EvaluateParams)
    if not args.to.isdigit():
        print(f"pairgan rollback: --to must be a version number, got {args.to!r}", file=sys.stderr)
        return ExitStatus.BAD_PARAMS

    try:
        device = pick_device(evaluate_params.device)
    except RuntimeError as error:  # device: cuda without a GPU
        return _fail(str(error))
    tracking_uri = environment.tracking_uri()
    try:
        check_tracking_reachable(tracking_uri, params.experiment)
        outcome = roll_back(tracking_uri, params, str(int(args.to)), args.reason, device)
    except (TrackingUnavailable, RollbackRefused, RegistryBusy, LockLost) as error:
        return _fail(redact_text(str(error), tracking_uri))

    write_json_atomic(Path(args.out), outcome.report(), sort_keys=False)
    if not outcome.changed:
        log.info("%s version %s is already @champion; nothing changed", outcome.model_name, outcome.champion_version)
    elif outcome.champion_version != outcome.requested_version:
        return _fail(f"@champion is version {outcome.champion_version} after the move, not {outcome.requested_version}: "
                     "it was changed outside pairgan at the same time")
    else:
        log.info(
            "%s @champion: version %s -> %s (%s); recorded in MLflow run %s of %s",
            outcome.model_name, outcome.champion_version_before, outcome.champion_version, outcome.reason,
            outcome.run_id, redact_uri(tracking_uri),
        )
    return ExitStatus.OK

