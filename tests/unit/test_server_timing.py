"""The `Server-Timing` value: capgate's own time apart from the upstream's wait."""

from proxy.server_timing import GatewayTime


def server_timing(started: float, forwarded: float | None, answered: float | None, ended: float) -> str:
    return GatewayTime.of(started, forwarded, answered, ended).header()


def test_a_forwarded_request_has_capgates_time_before_the_upstream_the_wait_and_capgates_total() -> None:
    header = server_timing(10.0, 10.0004, 10.0124, 10.0126)
    assert header == (
        'capgate-pre;dur=0.400;desc="capgate before the upstream", '
        'upstream;dur=12.000;desc="vLLM until its answer began", '
        'capgate;dur=0.600;desc="capgate in total"'
    )


def test_a_request_refused_before_it_was_forwarded_has_capgates_time_only() -> None:
    assert server_timing(5.0, None, None, 5.00125) == 'capgate;dur=1.250;desc="capgate in total"'


def test_an_answer_that_never_began_counts_the_wait_until_the_response() -> None:
    assert server_timing(1.0, 1.001, None, 1.5).split(", ")[1:] == [
        'upstream;dur=499.000;desc="vLLM until its answer began"',
        'capgate;dur=1.000;desc="capgate in total"',
    ]


def test_a_clock_that_seems_to_run_backwards_gives_no_negative_duration() -> None:
    spent = GatewayTime.of(2.0, 1.9, 1.8, 1.7)
    assert (spent.pre, spent.upstream, spent.total) == (0.0, 0.0, 0.0)
