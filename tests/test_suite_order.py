"""The suite's own order (tests/conftest.py): the modules it starts with must exist."""

from pathlib import Path

from conftest import LONGEST_MODULES

REPOSITORY = Path(__file__).resolve().parents[1]


def test_every_module_the_suite_starts_with_exists():
    missing = [module for module in LONGEST_MODULES if not (REPOSITORY / module).is_file()]
    assert missing == [], f"tests/conftest.py's LONGEST_MODULES names modules that are gone: {missing}"
