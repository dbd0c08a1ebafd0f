"""Stage prepare: turn paired images (folder, A/B folders, s3://, or the built-in set) into WebDataset shards.

Writes OUT/<split>/<split>-NNNNNN.tar with a DALI .idx each, OUT/manifest.json (the commit
point) and a JSON report for DVC metrics; OUT is a local folder or s3://bucket/prefix (that
store is reached through boto3's standard configuration: AWS_ENDPOINT_URL, AWS_REGION, the
credential chain). Bad inputs stop the stage (all of them listed) unless params/data.yaml
says on_bad_input: skip. A second run on the same OUT stops at once, naming the first.
"""

import argparse
import logging
from pathlib import Path

from components.atomic_files import write_json_atomic
from components.config import load_params
from components.config.data import DataParams
from components.data.manifest import ManifestError
from components.data.sources import SourceError, open_source
from components.data.writer import PrepareError, prepare_dataset
from components.locks import LockError
from components.object_store import ObjectStoreError
from components.redaction import redact_text
from pipelines.exit_status import ExitStatus

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="data/prepared", help="output folder or s3://bucket/prefix (default: data/prepared)"
    )
    parser.add_argument(
        "--report", type=Path, default=Path("reports/prepare.json"), help="stage report (default: reports/prepare.json)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def run(args: argparse.Namespace) -> int:
    base_dir = Path.cwd()
    params = load_params(Path(args.params_dir) / "data.yaml", DataParams, context={"base_dir": base_dir})
    try:
        listing = open_source(params, base_dir)
        result = prepare_dataset(params, listing, args.out, progress=not args.no_progress)
    except (SourceError, PrepareError, ManifestError, LockError, ObjectStoreError) as error:
        log.error("%s", redact_text(str(error)))
        return ExitStatus.FAILED
    report = result.report()
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.report, report, indent=1)
    log.info(
        "prepared %s: %s pairs (%d new, %d skipped, %d changed) in %.1f s; manifest %s",
        args.out, report["counts"], report["new_pairs"], report["skipped"], report["changed"],
        report["seconds"], report["manifest_checksum"][:12],
    )
    return ExitStatus.OK
