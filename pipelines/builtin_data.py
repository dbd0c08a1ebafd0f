"""Stage builtin-data: write the built-in example pairs (edge map | photo) as a pix2pix folder.

The default `source` in params/data.yaml points at this folder, so `dvc repro` runs on a fresh
machine with no download; point `source.path` at your own folder to train on your data.
"""

import argparse
import logging
from pathlib import Path

from components.config import load_params
from components.config.data import DataParams
from components.data.builtin import write_builtin_folder
from pipelines.exit_status import ExitStatus

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("data/builtin"), help="output folder (default: data/builtin)")


def run(args: argparse.Namespace) -> int:
    # Only source.builtin and image_size matter here; source.path may name this stage's own
    # output, which does not exist yet on a first run, so it is not checked.
    params = load_params(Path(args.params_dir) / "data.yaml", DataParams, context={"check_source_path": False})
    counts = write_builtin_folder(params.source.builtin, params.image_size, args.out)
    log.info("wrote the built-in pairs to %s: %s", args.out, counts)
    return ExitStatus.OK
