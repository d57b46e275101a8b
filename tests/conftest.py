"""Shared fixtures: a small packed dataset built once per test session from the embedded corpus.
Hooks: each test gets its folder's marker; under pytest-xdist a `timed` test runs alone.
Fixtures and pytest hooks only: helpers live in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Helpers assert too: pytest shows their failing values as it does for the tests' own asserts.
pytest.register_assert_rewrite("tests.helpers")

from tests.helpers.worker_gate import GATE, WorkerGate  # noqa: E402 (after the rewrite hook)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.config import DataConfig, TokenizerConfig
    from lmforge.data.pack import prepare_data

    out = tmp_path_factory.mktemp("tiny-data")
    return prepare_data(DataConfig(corpus="default", dir=str(out), max_documents=120, val_fraction=0.05),
                        TokenizerConfig(vocab_size=512, min_frequency=2), log=lambda *_: None)


def _threads_restored():
    """torch's intra-op thread count is process-wide: a test or module that changes it must not pass
    it on, or later tests' numbers (GEMMs block and sum by thread count) would depend on which tests
    ran before them."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


# Autouse fixtures run first and are torn down last in their scope: these undo what a test, or a
# module's fixtures, did to the thread count (a module opting into one thread gets it back after).
module_threads_restored = pytest.fixture(scope="module", autouse=True, name="module_threads_restored")(_threads_restored)
test_threads_restored = pytest.fixture(autouse=True, name="test_threads_restored")(_threads_restored)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine (up to 40x
    slower). A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`;
    `module_threads_restored` gives the count back after the module."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The folder says how a test runs: each test gets its folder's marker (`-m cli`,
    `-m "not multi_rank"`). Every test in tests/multi_rank spawns several gloo ranks, so it is
    `distributed` too (tests/cli marks its multi-rank cases one by one). Then the run's order."""
    folder_markers = {"unit": ("unit",), "multi_rank": ("multi_rank", "distributed"), "cli": ("cli",)}
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        path = Path(item.path).resolve()
        if not path.is_relative_to(tests_dir):
            continue
        folder = path.relative_to(tests_dir).parts[0]
        for name in folder_markers.get(folder, ()):
            item.add_marker(name)
    # Files with long (`slow`) cases first, each file's own order kept: pytest-xdist deals files
    # out in this order (scripts/test.sh: --no-loadscope-reorder), so long files start early and
    # short ones fill in at the end, rather than one long file running on while a worker idles.
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def pytest_configure(config: pytest.Config) -> None:
    """On a pytest-xdist worker, open the gate the run's workers share: pytest-xdist gives each
    worker a basetemp inside the run's own (`<run basetemp>/popen-gw0`)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and config.option.basetemp:
        config.stash[GATE] = WorkerGate(Path(config.option.basetemp).parent / "worker-gate")


def pytest_unconfigure(config: pytest.Config) -> None:
    if GATE in config.stash:
        config.stash[GATE].close()


def _timed(item: pytest.Item | None) -> bool:
    return item is not None and item.get_closest_marker("timed") is not None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """A `timed` test (it asserts on wall-clock time) runs with no other worker's test running;
    the others run side by side. Setup and teardown are inside, module fixtures included. Timed
    tests in a row keep the exclusive hold (no wait for another worker's test between them)."""
    gate = item.config.stash.get(GATE, None)
    if gate is None:
        return (yield)
    if not gate.alone:
        gate.enter(alone=_timed(item))
    try:
        return (yield)
    finally:
        if not (_timed(item) and _timed(nextitem)):
            gate.leave()
