"""Stage evaluate (placeholder: its issue replaces this module)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("stage evaluate is not implemented yet")
