import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # lets tests import the shared opcheck helpers

import pytest

# Every compilation re-verifies its graph after each stage and validates its memory plan
# (passes/pipeline.py): a pass that breaks a type fails the test that ran it, not a later stage.
# tests/test_training.py takes 12.8-15.2 s without, 15.6-16.2 s with (two runs each).
os.environ.setdefault("GRAPHC_VERIFY", "1")


@pytest.fixture(autouse=True, scope="session")
def graphc_cache_dir(tmp_path_factory):
    """Compiled kernels go to a fresh directory per test session, never the user's cache."""
    previous = os.environ.get("GRAPHC_CACHE_DIR")
    os.environ["GRAPHC_CACHE_DIR"] = str(tmp_path_factory.mktemp("graphc_cache"))
    yield os.environ["GRAPHC_CACHE_DIR"]
    if previous is None:
        del os.environ["GRAPHC_CACHE_DIR"]
    else:
        os.environ["GRAPHC_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def seeded_graphc():
    """graphc's own generator (parameter initialisation, traced randomness) starts from one seed
    in every test, so a test's weights never depend on which tests ran before it."""
    import graphc
    graphc.manual_seed(0)


def pytest_terminal_summary(terminalreporter):
    """How many random programs ran on each backend, and how many failed (when any ran)."""
    programs = sys.modules.get("random_programs")
    if programs is None or not programs.COUNTS:
        return
    counts = ", ".join(f"{name}: {count}" for name, count in sorted(programs.COUNTS.items()))
    terminalreporter.write_line(f"random programs run: {counts}")
