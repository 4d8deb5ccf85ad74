"""Small self-contained SVG line plots for the benchmarks (no plotting library in the runtime's dependencies)."""

from __future__ import annotations

import math

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def svg_lines(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, x_fmt=None,
              y_fmt=None, log_y: bool = False, points_only: tuple[str, ...] = ()) -> str:
    """One polyline per series (those in points_only: markers only, labelled), axes, ticks, a legend."""
    w, h, m = 640, 400, 60
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and (y > 0 or not log_y)]
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"></svg>\n'
    fy = math.log10 if log_y else (lambda v: v)
    xs = [x for x, _ in pts]
    ys = [fy(y) for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (min(ys), max(ys)) if log_y else (0.0, max(ys) * 1.1)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    x_fmt = x_fmt or (lambda v: f"{v:g}")
    y_fmt = y_fmt or (lambda v: f"{v:.3g}")

    def px(x, y):
        return m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (fy(y) - y0) / (y1 - y0) * (h - 2 * m)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">{x_label}</text>',
             f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">{y_label}</text>']
    for k in range(6):
        x = x0 + (x1 - x0) * k / 5
        a, _ = px(x, 10 ** y0 if log_y else y0)
        parts.append(f'<text x="{a:.1f}" y="{h - m + 16}" text-anchor="middle">{x_fmt(x)}</text>')
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        y = 10 ** yv if log_y else yv
        _, b = px(x0, y)
        parts.append(f'<text x="{m - 6}" y="{b + 4:.1f}" text-anchor="end">{y_fmt(y)}</text>')
    for k, ((name, s), color) in enumerate(zip(series.items(), COLORS)):
        p = [px(x, y) for x, y in s if y is not None and (y > 0 or not log_y)]
        if not p:
            continue
        if name not in points_only:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                         + " ".join(f"{a:.1f},{b:.1f}" for a, b in p) + '"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in p]
        parts.append(f'<text x="{w - m - 150}" y="{m + 18 * k}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
