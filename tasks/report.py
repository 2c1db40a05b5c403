"""Pictures of an evaluation: sample grids with the prompt under each row, the guidance plots
(matplotlib, Agg), and a single-file HTML report with every image inlined (base64)."""

from __future__ import annotations

import base64
import html
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAD = 4
LINE = 12  # text line height of PIL's default bitmap font, px


def _cell(image: np.ndarray | Image.Image, size: int) -> Image.Image:
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    return im.convert("RGB").resize((size, size), Image.Resampling.NEAREST if im.size[0] <= size else Image.Resampling.BICUBIC)


def sample_grid(rows: Sequence[tuple[str, Sequence[np.ndarray]]], column_titles: Sequence[str] = (), cell: int = 96) -> Image.Image:
    """One row of images per prompt, the prompt written under its row; optional column titles on top."""
    font = ImageFont.load_default()
    columns = max((len(images) for _, images in rows), default=1)
    width = PAD + columns * (cell + PAD)
    chars = max(8, width // 6)  # the default font is ~6 px per character
    wrapped = [textwrap.wrap(caption, chars)[:3] or [""] for caption, _ in rows]
    title_h = LINE + PAD if column_titles else 0
    height = PAD + title_h + sum(cell + PAD + len(lines) * LINE + PAD for lines in wrapped)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles):
        draw.text((PAD + c * (cell + PAD), PAD), title[: cell // 6], fill=(90, 90, 90), font=font)
    y = PAD + title_h
    for (caption, images), lines in zip(rows, wrapped):
        for c, image in enumerate(images):
            canvas.paste(_cell(image, cell), (PAD + c * (cell + PAD), y))
        y += cell + PAD
        for line in lines:
            draw.text((PAD, y), line, fill=(0, 0, 0), font=font)
            y += LINE
        y += PAD
    return canvas


def guidance_plots(sweep: list[dict[str, float]], out_dir: Path) -> list[Path]:
    """fd_vs_guidance.png (the paper's fig. 11 axis: Fréchet distance against decoder guidance),
    aesthetic_vs_recall.png (fig. 13: the probe's mean score against recall, one point per
    guidance scale; when every row has a recall) and aesthetic_vs_diversity.png (the same against
    sample diversity). `sweep`: rows with guidance, fd_clip, aesthetic, diversity (and fid, recall)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [row["guidance"] for row in sweep]
    paths = []
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    ax.plot(g, [row["fd_clip"] for row in sweep], "o-", label="fd_clip (CLIP features)")
    if all("fid" in row for row in sweep):
        ax.plot(g, [row["fid"] for row in sweep], "s--", label="FID (Inception)")
    ax.set_xlabel("decoder guidance scale")
    ax.set_ylabel("Fréchet distance (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "fd_vs_guidance.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    against = [("diversity", "diversity (mean pairwise CLIP distance)")]
    if all("recall" in row for row in sweep):
        against.insert(0, ("recall", "recall (k-NN, CLIP image features)"))
    for key, label in against:
        fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
        ax.plot([row[key] for row in sweep], [row["aesthetic"] for row in sweep], "o-")
        for row in sweep:
            ax.annotate(f"g={row['guidance']:g}", (row[key], row["aesthetic"]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(label)
        ax.set_ylabel("aesthetic probe (mean)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out_dir / f"aesthetic_vs_{key}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def _inline_png(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def _number(value) -> str:
    return "missing" if value is None else f"{value:.4g}"


def html_report(path: Path, title: str, metrics: dict[str, float], notes: Sequence[str],
                sections: Sequence[tuple[str, Sequence[Path]]], bars: Sequence[dict] = (),
                stage_seconds: dict[str, float] | None = None) -> Path:
    """One self-contained HTML file: notes, the quality bars (passed or not), the wall time of
    each stage, each section's images, then the metrics table."""
    rows = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in sorted(metrics.items()))
    bar_rows = "\n".join(
        f"<tr><td>{html.escape(b['bar'])}</td><td>{_number(b['value'])}</td><td>{_number(b['threshold'])}</td>"
        f"<td style='color:{'green' if b['passed'] else 'red'}'>{'pass' if b['passed'] else 'FAIL'}</td></tr>" for b in bars)
    time_rows = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{v:.0f} s</td></tr>" for k, v in (stage_seconds or {}).items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px}"
        "table{border-collapse:collapse}td{border:1px solid #ccc;padding:2px 8px;font-size:13px}"
        "td:nth-child(2){text-align:right;font-family:monospace}img{max-width:100%;margin:4px 0}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "".join(f"<p>{html.escape(n)}</p>" for n in notes),
    ]
    if bars:
        parts += ["<h2>Quality bars</h2>",
                  f"<table><tr><th>bar</th><th>value</th><th>threshold</th><th></th></tr>{bar_rows}</table>"]
    if stage_seconds:
        total = sum(stage_seconds.values())
        parts += ["<h2>Wall time per stage</h2>",
                  f"<table><tr><th>stage</th><th>wall time</th></tr>{time_rows}"
                  f"<tr><td><b>total</b></td><td>{total:.0f} s</td></tr></table>"]
    for heading, images in sections:
        if not images:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.extend(f"<div>{_inline_png(p)}</div>" for p in images)
    parts += ["<h2>Metrics</h2>", f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>", "</body></html>"]
    path.write_text("\n".join(parts))
    return path


def to_png(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
