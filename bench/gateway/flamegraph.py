"""A flame graph as a self-contained SVG, drawn from py-spy's raw (collapsed) samples (pure).

Each line of the input is `frame;frame;...;frame COUNT`, outermost frame first. A frame's box is as
wide as the share of samples under it; its children sit on top of it, widest first. Boxes
narrower than `MIN_SHARE` are left out; every box has a tooltip (`<title>`) with its frame and
share.
"""

from html import escape

WIDTH = 1200
ROW = 16
MIN_SHARE = 0.002
_CHAR_PX = 6.5


class _Node:
    __slots__ = ("children", "samples")

    def __init__(self) -> None:
        self.samples = 0
        self.children: dict[str, _Node] = {}


def _tree(raw: str) -> _Node:
    root = _Node()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        node = root
        node.samples += samples
        for frame in stack.split(";"):
            node = node.children.setdefault(frame, _Node())
            node.samples += samples
    return root


def _colour(frame: str) -> str:
    own = any(marker in frame for marker in ("(proxy/", "(metering/", "(policies/"))
    shade = sum(frame.encode()) % 60
    return f"rgb(230,{110 + shade},{40 + shade // 2})" if not own else f"rgb({60 + shade},150,220)"


def _label(frame: str, width: float) -> str:
    """`frame` as much as fits in a box `width` pixels wide (cut with an ellipsis, or empty)."""
    fits = int((width - 4) / _CHAR_PX)
    if len(frame) <= fits:
        return frame
    return frame[: fits - 1] + "…" if fits > 1 else ""


def _depth(node: _Node) -> int:
    return 1 + max((_depth(child) for child in node.children.values()), default=0)


def flame_svg(raw: str, title: str) -> str:
    """The flame graph of `raw` samples, headed `title` (capgate's frames in blue)."""
    root = _tree(raw)
    height = _depth(root) * ROW + 24
    boxes: list[str] = []

    def draw(children: dict[str, _Node], x: float, level: int) -> None:
        y = height - (level + 1) * ROW
        for frame, node in sorted(children.items(), key=lambda item: -item[1].samples):
            share = node.samples / root.samples
            width = WIDTH * share
            if share >= MIN_SHARE:
                label = _label(frame, width)
                box = f'x="{x:.1f}" y="{y}" width="{width:.1f}" height="{ROW - 1}"'
                boxes.append(
                    f"<g><title>{escape(frame)} ({share:.1%})</title>"
                    f'<rect {box} fill="{_colour(frame)}"/>'
                    f'<text x="{x + 2:.1f}" y="{y + ROW - 4}">{escape(label)}</text></g>'
                )
                draw(node.children, x, level + 1)
            x += width

    if root.samples:
        draw(root.children, 0.0, 0)
    body = "\n".join(boxes)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="monospace" font-size="11">\n'
        f'<text x="4" y="16" font-size="14">{escape(title)} ({root.samples} samples)</text>\n{body}\n</svg>\n'
    )
