"""Recorded CLI contracts: ``--update-contracts`` rewrites the expected data from the code.

Use it only when an argv change is intended; reviewers then see the change as a JSON diff.
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-contracts", action="store_true", default=False,
                     help="rewrite tests/contracts/**/*.json 'expected' blocks from the current code")


@pytest.fixture
def update_contracts(request: pytest.FixtureRequest) -> bool:
    # the option is registered only when this conftest is an initial one; default to checking
    try:
        return bool(request.config.getoption("--update-contracts"))
    except ValueError:
        return False
