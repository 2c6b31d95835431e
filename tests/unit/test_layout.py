"""The test-and-bench harness is one package under one name, `tests.harness`, for the tests and
the bench alike: a second top-level name would load every harness module twice."""

import importlib.util
import sys

import tests.harness


def test_the_harness_is_imported_as_tests_harness_only() -> None:
    assert tests.harness.__name__ == "tests.harness"
    assert importlib.util.find_spec("harness") is None
    assert not [name for name in sys.modules if name == "harness" or name.startswith("harness.")]
