"""The added-latency benchmark's arithmetic: per-path percentiles and what a gateway adds."""

import pytest

from bench.added.probe import summarize, table


def test_added_figures_are_the_gateway_less_the_direct_path() -> None:
    seen = {"direct": [10.0, 12.0, 14.0, 11.0, 13.0], "capgate": [11.0, 13.5, 14.5, 12.0, 15.0]}
    figures = summarize(seen)
    direct, capgate = figures["direct"], figures["capgate"]
    assert (direct["requests"], direct["median_ms"]) == (5, 12.0)
    assert capgate["median_ms"] == 13.5
    assert capgate["added_median_ms"] == pytest.approx(1.5)
    assert direct["p99_ms"] == pytest.approx(13.96)
    assert capgate["added_p99_ms"] == pytest.approx(capgate["p99_ms"] - direct["p99_ms"])
    # per-round differences 1.0, 1.5, 0.5, 1.0, 2.0: their median, not the difference of medians
    assert capgate["paired_difference_median_ms"] == pytest.approx(1.0)
    assert "added_median_ms" not in direct


def test_table_has_a_row_per_path_with_dashes_for_the_direct_path() -> None:
    text = table(summarize({"direct": [1.0, 2.0], "capgate": [2.0, 4.0]}))
    rows = text.splitlines()
    assert len(rows) == 4
    assert rows[2] == "| direct | 2 | 1.50 | 1.99 | – | – | – |"
    assert rows[3].startswith("| capgate | 2 | 3.00 | 3.98 | +1.50 | +1.99 | +1.50 |")
