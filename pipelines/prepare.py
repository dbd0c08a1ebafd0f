"""Stage prepare (placeholder: its issue replaces this module)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("stage prepare is not implemented yet")
