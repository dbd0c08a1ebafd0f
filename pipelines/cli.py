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
from pipelines import builtin_data, environment, evaluate, predict, prepare, register, retrain, rollback, train, tune
from pipelines.exit_status import ExitStatus

# name -> module with `add_arguments(parser)` and `run(args) -> int`, listed explicitly so a
# reader sees every stage here (no discovery by string).
STAGES: dict[str, ModuleType] = {
    "builtin-data": builtin_data,
    "prepare": prepare,
    "train": train,
    "tune": tune,
    "evaluate": evaluate,
    "register": register,
    "rollback": rollback,
    "retrain": retrain,
    "predict": predict,
}


VERBOSE_HELP = "also show what the libraries underneath say (Ray's internals, MLflow), and debug lines"


def _version() -> str:
    try:
        return importlib.metadata.version("pairgan")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairgan", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pairgan {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, module in STAGES.items():
        doc = (module.__doc__ or name).strip()
        stage_parser = commands.add_parser(name, help=doc.splitlines()[0], description=doc)
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
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    environment.configure_process()
    try:
        return args.stage.run(args)
    except ParamsError as error:
        print(f"pairgan {args.command}: {error}", file=sys.stderr)
        return ExitStatus.BAD_PARAMS


if __name__ == "__main__":
    sys.exit(main())
