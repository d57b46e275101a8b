"""Shared fixtures: a small packed dataset built once per test session from the embedded corpus.
Fixtures and pytest hooks only: helpers live in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest

# Helpers assert too: pytest shows their failing values as it does for the tests' own asserts.
pytest.register_assert_rewrite("tests.helpers")


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
    `distributed` too (tests/cli marks its multi-rank cases one by one)."""
    folder_markers = {"unit": ("unit",), "multi_rank": ("multi_rank", "distributed"), "cli": ("cli",)}
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        path = Path(item.path).resolve()
        if not path.is_relative_to(tests_dir):
            continue
        folder = path.relative_to(tests_dir).parts[0]
        for name in folder_markers.get(folder, ()):
            item.add_marker(name)
