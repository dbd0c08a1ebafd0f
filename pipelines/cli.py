"""The `pairgan` command: one subcommand per stage, each a module of this package.

Exit status: 0 success, 1 failure, 2 invalid params or arguments (nothing was run),
3 training diverged (the run is finished as failed-by-divergence, not retried).
"""

import argparse
import logging
import sys
from types import ModuleType

from components.config import ParamsError
from pipelines import builtin_data, evaluate, predict, prepare, register, train, tune
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
    "predict": predict,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairgan", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, module in STAGES.items():
        doc = (module.__doc__ or name).strip()
        stage_parser = commands.add_parser(name, help=doc.splitlines()[0], description=doc)
        stage_parser.add_argument(
            "--params-dir", default="params", help="folder holding the stages' YAML params (default: params)"
        )
        module.add_arguments(stage_parser)
        stage_parser.set_defaults(stage=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.stage.run(args)
    except ParamsError as error:
        print(f"pairgan {args.command}: {error}", file=sys.stderr)
        return ExitStatus.BAD_PARAMS


if __name__ == "__main__":
    sys.exit(main())
