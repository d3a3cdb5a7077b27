"""A line chart written with PIL (matplotlib is not a dependency): labelled axes, ticks, legend, markers."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _legend_room(names, font, right: int, pad: int) -> int:
    """The right margin that fits the longest legend entry (``pad``: the marker before the text, the gap after),
    at least ``right``."""
    return max(right, int(max((font.getlength(n) for n in names), default=0)) + pad)


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = max(hi - lo, 1e-9)
    raw = span / n
    mag = 10 ** int(f"{raw:e}".split("e")[1])
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = step * int(lo // step)
    ticks, v = [], start
    while v <= hi + 1e-9:
        if v >= lo - 1e-9:
            ticks.append(round(v, 10))
        v += step
    return ticks


def _frame(img, d, fonts, *, right: int, x_range, y_range, title: str, xlabel: str, ylabel: str):
    """Frame, grid, ticks, title and axis labels of a chart on ``img``; returns px(x, y) -> pixel position."""
    w, h = img.size
    left, top, bottom = 80, 50, 70
    f_small, f_mid, f_big = fonts
    (x0, x1), (y0, y1) = x_range, y_range

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for yt in _nice_ticks(y0, y1):
        _, py = px(x0, yt)
        d.line([left, py, w - right, py], fill=(225, 225, 225))
        d.line([left - 5, py, left, py], fill="black")
        label = f"{yt:g}"
        d.text((left - 8 - d.textlength(label, font=f_small), py - 7), label, fill="black", font=f_small)
    for xt in _nice_ticks(x0, x1, 10):
        pxx, _ = px(xt, y0)
        d.line([pxx, h - bottom, pxx, h - bottom + 5], fill="black")
        label = f"{xt:g}"
        d.text((pxx - d.textlength(label, font=f_small) / 2, h - bottom + 8), label, fill="black", font=f_small)
    d.text(((w - right + left) / 2 - d.textlength(title, font=f_big) / 2, 14), title, fill="black", font=f_big)
    d.text(((w - right + left) / 2 - d.textlength(xlabel, font=f_mid) / 2, h - bottom + 32), xlabel, fill="black",
           font=f_mid)
    ylab = Image.new("RGBA", (int(d.textlength(ylabel, font=f_mid)) + 4, 20), (255, 255, 255, 0))
    ImageDraw.Draw(ylab).text((2, 0), ylabel, fill="black", font=f_mid)
    ylab = ylab.rotate(90, expand=True)
    img.paste(ylab, (18, int((h - bottom + top) / 2 - ylab.size[1] / 2)), ylab)
    return px


def line_chart(series: dict[str, list[tuple[float, float]]], path, *, title: str, xlabel: str, ylabel: str,
               marked: dict[str, float] | None = None, size=(900, 560), y_range=None) -> None:
    """Write a PNG: one polyline with dot markers per series (points (x, y)); ``marked[name] = x`` draws a
    ring around that series' point at x (e.g. the chosen default)."""
    f_mid = _font(15)
    top, base = 50, 200  # base: the right margin ``size`` allows for the legend
    right = _legend_room([*series, "chosen default"], f_mid, base, 70)
    w, h = size[0] - base + right, size[1]  # the plot keeps its width; a long legend widens the image
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    if y_range is None:
        pad = max((max(ys) - min(ys)) * 0.15, 2.0)
        y_range = (max(0.0, min(ys) - pad), min(100.0, max(ys) + pad))
    px = _frame(img, d, (_font(13), f_mid, _font(18)), right=right, x_range=(0.0, max(xs) * 1.05), y_range=y_range,
                title=title, xlabel=xlabel, ylabel=ylabel)
    # series
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        pts = sorted(pts)
        xy = [px(x, y) for x, y in pts]
        if len(xy) > 1:
            d.line(xy, fill=color, width=3)
        for (x, _), (a, b) in zip(pts, xy):
            d.ellipse([a - 4, b - 4, a + 4, b + 4], fill=color)
            if marked and marked.get(name) == x:
                d.ellipse([a - 9, b - 9, a + 9, b + 9], outline=color, width=2)
        ly = top + 10 + 26 * i
        d.line([w - right + 15, ly + 8, w - right + 45, ly + 8], fill=color, width=3)
        d.text((w - right + 52, ly), name, fill="black", font=f_mid)
    if marked:
        ly = top + 10 + 26 * len(series) + 6
        d.ellipse([w - right + 24, ly + 2, w - right + 38, ly + 16], outline="black", width=2)
        d.text((w - right + 52, ly), "chosen default", fill="black", font=f_mid)
    img.save(path)


def scatter_chart(groups: dict[str, list[tuple[float, float, float, str]]], path, *, title: str, xlabel: str,
                  ylabel: str, chosen: tuple[str, str] | None = None, size=(1000, 620)) -> None:
    """Write a PNG: one colour per group, each point (x, y, y standard error, label) drawn as a dot with a
    vertical ±1 SE bar and its label; ``chosen`` = (group, label) rings that point (e.g. the default)."""
    f_small, f_mid = _font(12), _font(15)
    top, base = 50, 230  # base: the right margin ``size`` allows for the legend
    right = _legend_room([*groups, "chosen default"], f_mid, base, 60)
    w, h = size[0] - base + right, size[1]  # the plot keeps its width; a long legend widens the image
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [p for g in groups.values() for p in g]
    y_range = (max(0.0, min(p[1] - p[2] for p in pts) - 3.0), min(100.0, max(p[1] + p[2] for p in pts) + 3.0))
    px = _frame(img, d, (f_small, f_mid, _font(18)), right=right, x_range=(0.0, max(p[0] for p in pts) * 1.08),
                y_range=y_range, title=title, xlabel=xlabel, ylabel=ylabel)
    for i, (name, group) in enumerate(groups.items()):
        color = COLORS[i % len(COLORS)]
        for x, y, se, label in group:
            a, b = px(x, y)
            _, b_hi = px(x, y + se)
            _, b_lo = px(x, y - se)
            d.line([a, b_hi, a, b_lo], fill=color, width=2)
            d.ellipse([a - 4, b - 4, a + 4, b + 4], fill=color)
            d.text((a + 6, b - 14), label, fill=color, font=f_small)
            if chosen == (name, label):
                d.ellipse([a - 10, b - 10, a + 10, b + 10], outline="black", width=2)
        ly = top + 10 + 26 * i
        d.ellipse([w - right + 22, ly + 3, w - right + 32, ly + 13], fill=color)
        d.text((w - right + 44, ly), name, fill="black", font=f_mid)
    if chosen:
        ly = top + 10 + 26 * len(groups) + 6
        d.ellipse([w - right + 18, ly + 1, w - right + 36, ly + 17], outline="black", width=2)
        d.text((w - right + 44, ly), "chosen default", fill="black", font=f_mid)
    img.save(path)
