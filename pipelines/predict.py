"""Stage predict (placeholder: its issue replaces this module)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("stage predict is not implemented yet")
