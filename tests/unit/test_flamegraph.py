"""The bench's flame graph drawn from py-spy's collapsed samples (pure)."""

import xml.etree.ElementTree as ET

from bench.gateway.flamegraph import MIN_SHARE, WIDTH, flame_svg

SVG = "{http://www.w3.org/2000/svg}"


def _boxes(raw: str) -> dict[str, tuple[float, float, float]]:
    """Each frame's box: x, y, width."""
    root = ET.fromstring(flame_svg(raw, "t <&>"))
    found = {}
    for group in root.iter(f"{SVG}g"):
        frame = group.find(f"{SVG}title").text.rpartition(" (")[0]
        rect = group.find(f"{SVG}rect").attrib
        found[frame] = (float(rect["x"]), float(rect["y"]), float(rect["width"]))
    return found


def test_boxes_are_as_wide_as_their_samples_and_children_sit_on_their_parent() -> None:
    boxes = _boxes("main;serve;reserve 30\nmain;serve;relay <x> 10\nmain;idle 60\n")
    assert boxes["main"][2] == WIDTH
    assert boxes["idle"][2] == WIDTH * 0.6 and boxes["serve"][2] == WIDTH * 0.4
    assert boxes["idle"][0] == 0.0 and boxes["serve"][0] == WIDTH * 0.6  # widest first
    assert boxes["reserve"][0] == boxes["serve"][0]
    assert boxes["relay <x>"][0] == boxes["serve"][0] + WIDTH * 0.3
    assert boxes["reserve"][1] < boxes["serve"][1] < boxes["main"][1]


def test_boxes_under_the_minimum_share_and_malformed_lines_are_left_out() -> None:
    rare = int(1 / MIN_SHARE) * 10
    boxes = _boxes(f"main;hot {rare}\nmain;rare 1\nnot a sample line\n;\n")
    assert set(boxes) == {"main", "hot"}


def test_no_samples_draw_an_empty_graph() -> None:
    assert _boxes("") == {}
