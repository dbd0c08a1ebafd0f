"""The `pairgan` command: one subcommand per stage, each a module of this package.

Exit status: 0 success, 1 failure, 2 invalid params or arguments (nothing was run),
3 training diverged (the run is finished as failed-by-divergence, not retried).
"""

import argparse
import importlib.metadata
import logging
import os
import sys
from types import ModuleType

from components.config import ParamsError
from components.console import LOG_DATE_FORMAT, LOG_FORMAT
from pipelines import environment
from pipelines.exit_status import ExitStatus

# Every stage, with what `pairgan --help` says of it: the first line of its module's doc (a test
# checks they agree). A stage's module is imported only when it runs or shows its own help, in
# `stage_module`: most of them import torch, which `pairgan --help` and `pairgan prepare`
# (and builtin-data) need not wait for; train, tune, evaluate and register import it after
# checking their params.
STAGES: dict[str, str] = {
    "builtin-data": "Stage builtin-data: write the built-in example pairs (edge map | photo) as a pix2pix folder.",
    "prepare": "Stage prepare: turn paired images (folder, A/B folders, s3://, or the built-in set) into WebDataset shards.",
    "train": "Stage train: train the method of params/model.yaml on the prepared shards with Ray Train, tracked in MLflow.",
    "tune": "Stage tune: a Ray Tune sweep over params/model.yaml and params/train.yaml, as params/tune.yaml says.",
    "evaluate": "Stage evaluate: score the trained generator on the held-out split.",
    "register": "Stage register: log the generator to MLflow, register it as `challenger`, and gate `champion`.",
    "rollback": "Move @champion back to an earlier registered version and record why.",
    "retrain": "Retrain when there is something new: the one command every scheduler runs (CronJob, systemd timer, cron).",
    "predict": "Translate a folder of source images with a registered or saved generator.",
}


def stage_module(name: str) -> ModuleType:
    """The module of stage `name`: `add_arguments(parser)` and `run(args) -> int`."""
    if name == "builtin-data":
        from pipelines import builtin_data as module
    elif name == "prepare":
        from pipelines import prepare as module
    elif name == "train":
        from pipelines import train as module
    elif name == "tune":
        from pipelines import tune as module
    elif name == "evaluate":
        from pipelines import evaluate as module
    elif name == "register":
        from pipelines import register as module
    elif name == "rollback":
        from pipelines import rollback as module
    elif name == "retrain":
        from pipelines import retrain as module
    elif name == "predict":
        from pipelines import predict as module
    else:
        raise KeyError(f"no stage {name!r}")
    return module


VERBOSE_HELP = "also show what the libraries underneath say (Ray's internals, MLflow), and debug lines"


def _version() -> str:
    try:
        return importlib.metadata.version("pairgan")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def requested_stage(argv: list[str]) -> str | None:
    """The stage a command line names: its first word that is not an option (the top-level
    options take no values), if that is a stage."""
    first_word = next((word for word in argv if not word.startswith("-")), None)
    return first_word if first_word in STAGES else None


def build_parser(stage: str | None) -> argparse.ArgumentParser:
    """The whole command line; only `stage`'s own arguments are added (the others' modules stay unimported)."""
    parser = argparse.ArgumentParser(prog="pairgan", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pairgan {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, summary in STAGES.items():
        if name != stage:
            commands.add_parser(name, help=summary, description=summary)
            continue
        module = stage_module(name)
        stage_parser = commands.add_parser(name, help=summary, description=module.__doc__.strip())
        stage_parser.add_argument(
            "--params-dir", default="params", help="folder holding the stages' YAML params (default: params)"
        )
        # Also after the stage name (`pairgan train -v`); SUPPRESS keeps a `pairgan -v train` given before it.
        stage_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        module.add_arguments(stage_parser)
        stage_parser.set_defaults(stage=module)
    return parser


def configure_logging(verbose: bool) -> None:
    """Our INFO lines on stderr; the libraries' own info lines only with --verbose."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)
    if not verbose:
        # MLflow sets its loggers' level from this variable when it is first imported (and so
        # do the Ray workers this process starts); an explicit setting of the user's wins.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(requested_stage(argv)).parse_args(argv)
    configure_logging(args.verbose)
    environment.configure_process()
    try:
        return args.stage.run(args)
    except ParamsError as error:
        print(f"pairgan {args.command}: {error}", file=sys.stderr)
        return ExitStatus.BAD_PARAMS


if __name__ == "__main__":
    sys.exit(main())
