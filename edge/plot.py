"""Small line plots for the benchmarks, written as SVG (for the README) and PNG (Pillow draws it).

One layout (`_layout`: axes, ticks, polylines, markers, a legend, as drawing primitives) and two writers, so
the two files always show the same plot.
"""

from __future__ import annotations

import math
from pathlib import Path

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
W, H, M = 640, 400, 60


def _layout(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, x_fmt=None, y_fmt=None,
            log_y: bool = False, points_only: tuple[str, ...] = ()) -> list[tuple]:
    """Primitives: ("line", x1, y1, x2, y2), ("poly", points, color), ("dot", x, y, color),
    ("text", x, y, text, anchor, color, vertical)."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and (y > 0 or not log_y)]
    if not pts:
        return []
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
        return M + (x - x0) / (x1 - x0) * (W - 2 * M), H - M - (fy(y) - y0) / (y1 - y0) * (H - 2 * M)

    out: list[tuple] = [("line", M, H - M, W - M, H - M), ("line", M, M, M, H - M),
                        ("text", W / 2, H - 15, x_label, "middle", "black", False),
                        ("text", 15, H / 2, y_label, "middle", "black", True)]
    for k in range(6):
        x = x0 + (x1 - x0) * k / 5
        a, _ = px(x, 10 ** y0 if log_y else y0)
        out.append(("text", a, H - M + 16, x_fmt(x), "middle", "black", False))
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        y = 10 ** yv if log_y else yv
        _, b = px(x0, y)
        out.append(("text", M - 6, b + 4, y_fmt(y), "end", "black", False))
    for k, ((name, s), color) in enumerate(zip(series.items(), COLORS)):
        p = [px(x, y) for x, y in s if y is not None and (y > 0 or not log_y)]
        if not p:
            continue
        if name not in points_only:
            out.append(("poly", p, color))
        out += [("dot", a, b, color) for a, b in p]
        out.append(("text", W - M - 150, M + 18 * k, name, "start", color, False))
    return out


def svg_lines(series, x_label: str, y_label: str, **kw) -> str:
    """The plot as an SVG document (keywords: x_fmt, y_fmt, log_y, points_only)."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>']
    for p in _layout(series, x_label, y_label, **kw):
        if p[0] == "line":
            parts.append(f'<line x1="{p[1]}" y1="{p[2]}" x2="{p[3]}" y2="{p[4]}" stroke="black"/>')
        elif p[0] == "poly":
            parts.append(f'<polyline fill="none" stroke="{p[2]}" stroke-width="2" points="'
                         + " ".join(f"{a:.1f},{b:.1f}" for a, b in p[1]) + '"/>')
        elif p[0] == "dot":
            parts.append(f'<circle cx="{p[1]:.1f}" cy="{p[2]:.1f}" r="3" fill="{p[3]}"/>')
        else:
            _, x, y, text, anchor, color, vertical = p
            rot = f' transform="rotate(-90 {x} {y})"' if vertical else ""
            fill = f' fill="{color}"' if color != "black" else ""
            parts.append(f'<text x="{x:.1f}" y="{y:.1f}"{rot} text-anchor="{anchor}"{fill}>{text}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def png_lines(series, x_label: str, y_label: str, path: str | Path, **kw) -> None:
    """The same plot as a PNG file, drawn at twice the size for legibility."""
    from PIL import Image, ImageDraw, ImageFont

    scale = 2
    img = Image.new("RGB", (W * scale, H * scale), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=12 * scale)
    for p in _layout(series, x_label, y_label, **kw):
        if p[0] == "line":
            draw.line([v * scale for v in p[1:5]], fill="black", width=scale)
        elif p[0] == "poly":
            draw.line([(a * scale, b * scale) for a, b in p[1]], fill=p[2], width=2 * scale, joint="curve")
        elif p[0] == "dot":
            r = 3 * scale
            draw.ellipse([p[1] * scale - r, p[2] * scale - r, p[1] * scale + r, p[2] * scale + r], fill=p[3])
        else:
            _, x, y, text, anchor, color, vertical = p
            a = {"start": "l", "middle": "m", "end": "r"}[anchor] + "s"  # SVG's y is the text's baseline
            if not vertical:
                draw.text((x * scale, y * scale), text, fill=color, font=font, anchor=a)
                continue
            box = draw.textbbox((0, 0), text, font=font, anchor="ls")
            label = Image.new("RGBA", (box[2] - box[0] + 2, box[3] - box[1] + 2), (255, 255, 255, 0))
            ImageDraw.Draw(label).text((-box[0], -box[1]), text, fill=color, font=font, anchor="ls")
            label = label.rotate(90, expand=True)
            img.paste(label, (int(x * scale - label.width / 2), int(y * scale - label.height / 2)), label)
    img.save(path, optimize=True)


def write_plot(stem: str | Path, series, x_label: str, y_label: str, **kw) -> list[Path]:
    """STEM.svg and STEM.png of one plot; returns their paths."""
    stem = Path(stem)
    svg, png = stem.with_suffix(".svg"), stem.with_suffix(".png")
    svg.write_text(svg_lines(series, x_label, y_label, **kw))
    png_lines(series, x_label, y_label, png, **kw)
    return [svg, png]
