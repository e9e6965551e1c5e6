import pytest

from torch_mosa import cli


@pytest.fixture
def mosa():
    """`mosa ARGS...` through the real entry point; returns the exit code."""
    return lambda *argv: cli.main([str(a) for a in argv])
