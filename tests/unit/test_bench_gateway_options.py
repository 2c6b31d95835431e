"""The gateway bench's command line: capgate's worker count reaches the run, and a count below one
or not a whole number is refused before anything starts."""

import pytest

from bench.gateway.__main__ import options_from, parser


def test_the_worker_count_reaches_the_options() -> None:
    assert options_from(parser().parse_args(["--capgate-workers", "2"])).capgate_workers == 2
    assert options_from(parser().parse_args([])).capgate_workers == 1


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", "", "1e9"])
def test_a_worker_count_below_one_or_not_whole_is_refused(value: str) -> None:
    with pytest.raises(SystemExit) as refused:
        parser().parse_args(["--capgate-workers", value])
    assert refused.value.code == 2
