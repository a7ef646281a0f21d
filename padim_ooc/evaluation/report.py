"""The evaluation report: one HTML page, inline SVG charts, PNG heatmap overlays next to it.

No plotting library: the ROC curve and the score histogram are drawn as SVG
text, the overlays with PIL and a colormap interpolated with numpy.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# "inferno"-like anchors: dark (low score) to bright yellow (high score)
_CMAP = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
                  (245, 125, 21), (250, 193, 39), (252, 255, 164)], dtype=np.float64)
_GAP = 6


@dataclass
class Example:
    """One test image shown in the report.

    Attributes
    ----------
    path : Path
    defect_type : str
    score : float
    amap : ndarray of shape (crop, crop), float32
        Its anomaly map.
    mask : ndarray of shape (crop, crop), bool, or None
        Ground truth (None when the data set has no masks).
    view : ndarray of shape (crop, crop, 3), uint8, or None
        The image as the model saw it (filled in before the report is written).
    """

    path: Path
    defect_type: str
    score: float
    amap: np.ndarray
    mask: np.ndarray | None = None
    view: np.ndarray | None = None


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped) of shape (...) to RGB uint8 of shape (..., 3)."""
    v = np.clip(np.nan_to_num(values), 0.0, 1.0)
    pos = np.linspace(0.0, 1.0, len(_CMAP))
    rgb = np.stack([np.interp(v, pos, _CMAP[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that touch a pixel outside it (4-neighbours)."""
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def overlay_panels(view: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, *,
                   vmin: float, vmax: float, with_truth: bool) -> Image.Image:
    """A strip of panels: image | anomaly map | map over image | ground truth.

    Parameters
    ----------
    view : ndarray of shape (H, W, 3), uint8
        The image as the model saw it (resized, cropped).
    amap : ndarray of shape (H, W)
        Its anomaly map; colours span [vmin, vmax] (shared by all examples).
    mask : ndarray of shape (H, W), bool, or None
        Ground truth; None for a good image (drawn without outline).
    with_truth : bool
        Add the ground-truth panel (the data set has masks).
    """
    scaled = (np.asarray(amap, np.float64) - vmin) / max(vmax - vmin, 1e-12)
    heat = colormap(scaled)
    alpha = (np.clip(scaled, 0, 1) * 0.75)[..., None]
    gray = np.repeat(view.mean(axis=2, keepdims=True), 3, axis=2)
    blend = (gray * (1 - alpha) + heat * alpha).round().astype(np.uint8)
    panels = [view, heat, blend]
    if with_truth:
        truth = view.astype(np.float64).copy()
        if mask is not None and mask.any():
            truth[mask] = truth[mask] * 0.5 + np.array([255.0, 40.0, 40.0]) * 0.5
            truth[_outline(mask)] = (255, 40, 40)
        panels.append(truth.round().astype(np.uint8))
    h, w = view.shape[:2]
    strip = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * _GAP, h), (255, 255, 255))
    for k, panel in enumerate(panels):
        strip.paste(Image.fromarray(panel), (k * (w + _GAP), 0))
    return strip


def colorbar(width: int = 256, height: int = 14) -> Image.Image:
    """The colour scale as an image, low values on the left."""
    row = colormap(np.linspace(0.0, 1.0, width))
    return Image.fromarray(np.repeat(row[None], height, axis=0))


# ---- SVG charts ------------------------------------------------------------

def _thin(x: np.ndarray, y: np.ndarray, keep: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """At most ``keep`` points of a monotone curve, spread along its length."""
    if len(x) <= keep:
        return x, y
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    idx = np.unique(np.searchsorted(arc, np.linspace(0, arc[-1], keep)).clip(0, len(x) - 1))
    return x[idx], y[idx]


def svg_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray, str, str]], size: int = 360) -> str:
    """ROC curves as an inline SVG.

    Parameters
    ----------
    curves : sequence of (label, fpr, tpr, colour, dash)
        ``dash`` is an SVG ``stroke-dasharray`` ('' for solid).
    """
    m, w = 48, size - 64
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
             f'role="img" aria-label="ROC curve" font-family="sans-serif" font-size="12">',
             f'<rect x="{m}" y="16" width="{w}" height="{w}" fill="#fff" stroke="#999"/>']
    for t in (0.25, 0.5, 0.75):
        parts.append(f'<line x1="{m + t * w:.1f}" y1="16" x2="{m + t * w:.1f}" y2="{16 + w}" stroke="#eee"/>')
        parts.append(f'<line x1="{m}" y1="{16 + t * w:.1f}" x2="{m + w}" y2="{16 + t * w:.1f}" stroke="#eee"/>')
    for t in (0, 0.5, 1):
        parts.append(f'<text x="{m + t * w:.1f}" y="{16 + w + 16}" text-anchor="middle">{t:g}</text>')
        parts.append(f'<text x="{m - 6}" y="{16 + (1 - t) * w + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(f'<line x1="{m}" y1="{16 + w}" x2="{m + w}" y2="16" stroke="#bbb" stroke-dasharray="4 4"/>')
    parts.append(f'<text x="{m + w / 2}" y="{size - 8}" text-anchor="middle">false-positive rate '
                 '(normal flagged)</text>')
    parts.append(f'<text transform="translate(14,{16 + w / 2}) rotate(-90)" text-anchor="middle">'
                 'true-positive rate (defects found)</text>')
    for k, (label, fpr, tpr, colour, dash) in enumerate(curves):
        x, y = _thin(np.asarray(fpr, float), np.asarray(tpr, float))
        pts = " ".join(f"{m + a * w:.1f},{16 + (1 - b) * w:.1f}" for a, b in zip(x, y))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2" '
                     f'stroke-dasharray="{dash}"/>')
        ly = 16 + w - 14 - 16 * (len(curves) - 1 - k)
        parts.append(f'<line x1="{m + w * 0.45}" y1="{ly - 4}" x2="{m + w * 0.45 + 22}" y2="{ly - 4}" '
                     f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>')
        parts.append(f'<text x="{m + w * 0.45 + 28}" y="{ly}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_histogram(scores: np.ndarray, labels: np.ndarray, threshold: float | None,
                  width: int = 520, height: int = 300, bins: int = 30, decision: float | None = None) -> str:
    """Image-score histograms of good (blue) and defective (orange) images, threshold line
    (dashed red), and the model's stored (calibrated) threshold ``decision`` (solid green)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    lo, hi = float(scores.min()), float(scores.max())
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    good = np.histogram(scores[labels == 0], edges)[0]
    bad = np.histogram(scores[labels == 1], edges)[0]
    top = max(int(good.max(initial=0)), int(bad.max(initial=0)), 1)
    m, pw, ph = 48, width - 64, height - 80
    sx = lambda v: m + (v - lo) / (hi - lo) * pw
    sy = lambda c: 16 + ph - c / top * ph
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="score histogram" font-family="sans-serif" font-size="12">',
             f'<rect x="{m}" y="16" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    bw = pw / bins
    for i in range(bins):
        for counts, colour, off in ((good, "#1f77b4", 0.0), (bad, "#ff7f0e", 0.5)):
            if counts[i]:
                parts.append(f'<rect x="{m + i * bw + off * bw:.1f}" y="{sy(counts[i]):.1f}" '
                             f'width="{bw / 2:.1f}" height="{ph - (sy(counts[i]) - 16):.1f}" '
                             f'fill="{colour}" fill-opacity="0.85"/>')
    for k, t in enumerate(np.linspace(lo, hi, 5)):
        anchor = "end" if k == 4 else "middle"  # the last label stays inside the chart
        parts.append(f'<text x="{sx(t):.1f}" y="{16 + ph + 16}" text-anchor="{anchor}">{t:.3g}</text>')
    for c in (0, top):
        parts.append(f'<text x="{m - 6}" y="{sy(c) + 4:.1f}" text-anchor="end">{c}</text>')
    parts.append(f'<text x="{m + pw / 2}" y="{16 + ph + 34}" text-anchor="middle">image score '
                 '(maximum of the anomaly map)</text>')
    parts.append(f'<text transform="translate(14,{16 + ph / 2}) rotate(-90)" text-anchor="middle">images</text>')
    if threshold is not None and lo <= threshold <= hi:
        x = sx(threshold)
        parts.append(f'<line x1="{x:.1f}" y1="16" x2="{x:.1f}" y2="{16 + ph}" stroke="#c00" '
                     'stroke-width="2" stroke-dasharray="6 3"/>')
        parts.append(f'<text x="{x + 4:.1f}" y="30" fill="#c00">threshold {threshold:.4g}</text>')
    if decision is not None:
        x = sx(min(max(decision, lo), hi))  # drawn at the edge when outside the scores' range
        parts.append(f'<line x1="{x:.1f}" y1="16" x2="{x:.1f}" y2="{16 + ph}" stroke="#2a7" stroke-width="2"/>')
        parts.append(f'<text x="{x + 4:.1f}" y="46" fill="#2a7">calibrated {decision:.4g}</text>')
    ly = height - 10
    parts.append(f'<rect x="{m}" y="{ly - 10}" width="12" height="12" fill="#1f77b4"/>'
                 f'<text x="{m + 16}" y="{ly}">good</text>'
                 f'<rect x="{m + 70}" y="{ly - 10}" width="12" height="12" fill="#ff7f0e"/>'
                 f'<text x="{m + 86}" y="{ly}">defective</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ---- the page ----------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 24px auto;
       max-width: 1100px; padding: 0 16px; line-height: 1.45; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 32px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; margin-top: 0; }
.cards { display: flex; gap: 16px; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 12px 16px; flex: 1 1 240px; }
.card .v { font-size: 32px; font-weight: 600; } .card .n { color: #555; font-size: 14px; }
.na { color: #999; }
table { border-collapse: collapse; margin: 8px 0; } th, td { padding: 4px 10px; border-bottom: 1px solid #eee;
  text-align: right; } th { background: #f6f6f6; } td:first-child, th:first-child { text-align: left; }
.charts { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 0; } figcaption { color: #555; font-size: 14px; max-width: 520px; }
.ex { margin: 12px 0 20px; } .ex img { width: 100%; max-width: 960px; image-rendering: auto;
  border: 1px solid #ddd; }
.heads { display: grid; max-width: 960px; color: #555; font-size: 13px; text-align: center; }
.cap { font-size: 14px; } .flag { color: #c00; font-weight: 600; } .ok { color: #2a7; font-weight: 600; }
.note { background: #f7f7f2; border-left: 4px solid #cc9; padding: 8px 12px; font-size: 14px; }
code { background: #f2f2f2; padding: 0 3px; }
"""


def _e(value) -> str:
    """Any value as HTML text: everything from a file name, a folder name or a model attribute
    goes through here (quotes too, for attribute values)."""
    return html.escape(str(value), quote=True)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return '<span class="na">n/a</span>'
    return f"{value:.{digits}f}"


def _card(title: str, value, text: str, chance: str) -> str:
    return (f'<div class="card"><div>{html.escape(title)}</div><div class="v">{_fmt(value)}</div>'
            f'<div class="n">{text}</div><div class="n"><b>1.0</b> is perfect; <b>{chance}</b> is what '
            f'random scores get.</div></div>')


def write_report(out_dir: str | os.PathLike, metrics: dict, *, scores: np.ndarray, labels: np.ndarray,
                 image_roc: tuple[np.ndarray, np.ndarray], pixel_roc: tuple[np.ndarray, np.ndarray] | None,
                 sections: Sequence[tuple[str, str, str, Sequence[Example]]]) -> Path:
    """Write ``out_dir/report.html`` and its PNG files next to it.

    Parameters
    ----------
    metrics : dict
        What goes to metrics.json (see :func:`padim_ooc.evaluate.evaluate`).
    scores, labels : ndarray of shape (n_images,)
        Image scores and labels (0 good, 1 defect) of the scored images.
    image_roc, pixel_roc : (fpr, tpr) arrays
        ROC curves; ``pixel_roc`` None without masks.
    sections : sequence of (key, heading, explanation, examples)
        Groups of example images; each becomes ``<key>-<k>.png``.

    Returns
    -------
    Path of report.html.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with_truth = bool(metrics.get("has_masks"))
    shown = [ex for *_, exs in sections for ex in exs]
    vmin = min((float(ex.amap.min()) for ex in shown), default=0.0)
    vmax = max((float(ex.amap.max()) for ex in shown), default=1.0)
    threshold = (metrics.get("threshold") or {}).get("value")
    model = metrics.get("model", {})
    title = f"Anomaly detection report: {metrics.get('class', '')}"
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="sub">{_e(metrics["n_images"])} test images from <code>{_e(metrics.get("data", ""))}'
            f'</code> scored with a PaDiM model ({_e(model.get("backbone", "?"))}, '
            f'{_e(model.get("dims", "?"))} channels, fitted on {_e(model.get("n_train_images", "?"))} normal '
            f'images, input {_e(model.get("crop", "?"))}x{_e(model.get("crop", "?"))} px).</p>']
    body.append('<p class="note">Every image gets an <b>anomaly map</b> (how unusual each spot looks '
                'compared with the normal training images) and an <b>image score</b> (the highest value '
                'of its map). Higher means more likely defective. The numbers below say how well these '
                'scores separate the good test images from the defective ones; 1.0 is perfect, and each '
                'card says what random scores would get (0.5 for an AUROC, 0.15 for PRO).</p>')
    pix_text = ("Same question pixel by pixel: does a defect pixel (from the ground-truth masks) score "
                "higher than a normal pixel?" if metrics.get("pixel_auroc") is not None
                else "Not computed: this data set has no ground-truth masks.")
    pro_text = ("Per-region overlap: the average fraction of each defect region that is found, "
                "averaged over false-positive rates from 0 to 30 %." if metrics.get("pro") is not None
                else "Not computed: this data set has no ground-truth masks.")
    auc = metrics.get("image_auroc")
    img_text = "Image AUROC: the chance that a defective image scores higher than a good one"
    if auc is not None:
        img_text += f" (here {100 * auc:.1f} % of all pairs)."
    body.append('<div class="cards">' + _card("Image AUROC", auc, img_text, "0.5")
                + _card("Pixel AUROC", metrics.get("pixel_auroc"), pix_text, "0.5")
                + _card("PRO (up to 30 % FPR)", metrics.get("pro"), pro_text, "0.15") + "</div>")

    th = metrics.get("threshold") or {}
    body.append("<h2>Results per defect type</h2>")
    if threshold is not None:
        body.append(f'<p>The <b>threshold</b> {threshold:.4g} is the image score that best separates good '
                    f'from defective images on this test set (Youden\'s J; chosen on the test set itself, '
                    f'so it is optimistic). At that threshold {100 * th["good_flagged"]:.1f} % of the good '
                    f'images are flagged (false alarms) and {100 * th["defects_found"]:.1f} % of the '
                    f'defective images are found.</p>')
    rows = ["<tr><th>defect type</th><th>images</th><th>median score</th><th>score range</th>"
            "<th>AUROC vs good</th><th>flagged at threshold</th></tr>"]
    for r in metrics.get("per_type", []):
        rows.append(f"<tr><td>{_e(r['defect_type'])}</td><td>{_e(r['images'])}</td>"
                    f"<td>{r['score_median']:.4g}</td><td>{r['score_min']:.4g} &ndash; {r['score_max']:.4g}</td>"
                    f"<td>{_fmt(r.get('image_auroc'))}</td><td>{100 * r['flagged']:.1f} %</td></tr>")
    body.append("<table>" + "".join(rows) + "</table>")
    body.append('<p class="sub">"AUROC vs good": image AUROC of this type against the good images only. '
                '"flagged": share of the images of this type scoring at or above the threshold (for '
                '"good" these are false alarms).</p>')

    curves = [("images", image_roc[0], image_roc[1], "#1f77b4", "")]
    if pixel_roc is not None:
        curves.append(("pixels (dashed)", pixel_roc[0], pixel_roc[1], "#2ca02c", "6 3"))
    body.append("<h2>How the scores separate good from defective</h2><div class='charts'>")
    pixel_text = (" The green dashed curve counts <b>pixels</b> instead: x is the share of normal "
                  "pixels (outside the ground-truth masks) at or above a threshold, y the share of "
                  "defect pixels." if pixel_roc is not None else "")
    body.append(f"<figure>{svg_roc(curves)}<figcaption>ROC curve: each point is one threshold. "
                "The blue curve counts <b>images</b>: left to right, more good images are flagged (x) "
                f"and more defective images are found (y).{pixel_text} A perfect detector goes straight "
                "up to the top-left corner; the grey diagonal is chance.</figcaption></figure>")
    decision = metrics.get("decision")
    if decision:
        body.append(_decision_text(decision))
    body.append(f"<figure>{svg_histogram(scores, labels, threshold, decision=(decision or {}).get('threshold'))}"
                "<figcaption>Image scores of good (blue) and defective (orange) test images. The less the two "
                "overlap, the easier it is to set a threshold."
                + (" The green line is the model's stored (calibrated) threshold." if decision else "")
                + "</figcaption></figure></div>")

    body.append("<h2>Example images</h2>")
    colorbar().save(out / "colorbar.png")
    heads = ["image (as the model sees it)", "anomaly map", "map over the image"]
    if with_truth:
        heads.append("ground truth (red)")
    body.append(f'<p>Colours are on one scale for all examples: <img src="colorbar.png" alt="colour scale" '
                f'style="vertical-align:middle;width:200px;height:12px"> from {vmin:.3g} (dark) to '
                f'{vmax:.3g} (bright yellow). Bright spots are where the model sees something unusual.</p>')
    grid = f'style="grid-template-columns: repeat({len(heads)}, 1fr)"'
    for key, heading, text, examples in sections:
        if not examples:
            continue
        body.append(f"<h3>{html.escape(heading)}</h3><p>{html.escape(text)}</p>")
        for k, ex in enumerate(examples, 1):
            name = f"{key}-{k:02d}.png"
            overlay_panels(ex.view, ex.amap, ex.mask, vmin=vmin, vmax=vmax,
                           with_truth=with_truth).save(out / name)
            flagged = threshold is not None and ex.score >= threshold
            verdict = ('<span class="flag">flagged</span>' if flagged else '<span class="ok">passed</span>')
            body.append(f'<div class="ex"><div class="cap"><b>{html.escape(ex.defect_type)}</b> &middot; '
                        f'score {ex.score:.4g} &middot; {verdict} &middot; <code>{html.escape(_rel(ex.path))}'
                        f'</code></div><div class="heads" {grid}>'
                        + "".join(f"<div>{html.escape(h)}</div>" for h in heads)
                        + f'</div><img src="{name}" alt="{html.escape(heading)} {k}"></div>')
    t = metrics.get("timings", {})
    pm = metrics.get("pixel_metrics") or {}
    body.append("<h2>Details</h2><p class='sub'>")
    fitted = f"Fitted in {t['fit_s']:.1f} s. " if t.get("fit_s") is not None else ""
    body.append(fitted + f"Scored {_e(metrics['n_images'])} images in {t.get('score_s', 0):.1f} s "
                f"({t.get('images_per_s', 0):.1f} images/s). "
                + (f"Pixel metrics: {html.escape(str(pm.get('detail') or pm.get('method')))}; "
                   f"{pm.get('n_regions', 0)} defect regions. " if pm else "")
                + "All numbers are in <code>metrics.json</code>, every image score in "
                  "<code>scores.csv</code>.</p>")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _decision_text(d: dict) -> str:
    """The paragraph on the model's stored threshold: what it does on this test set."""
    how = (f"conformal, alpha = {d['alpha']:g}: at most {100 * d['alpha']:g} % of new normal images flagged"
           if d.get("alpha") is not None else f"rule {d['rule']}")
    pct = lambda v: _fmt(None if v is None else 100 * v, 1) + (" %" if v is not None else "")  # noqa: E731
    stale = (' <span class="flag">Stale: the statistics changed after the calibration.</span>'
             if d.get("stale") else "")
    return (f'<p>The model\'s <b>calibrated threshold</b> {d["threshold"]:.4g} ({html.escape(how)}; '
            f'{d["n_calibration"]} calibration images) flags {pct(d["false_alarm_rate"])} of the good test images '
            f'(false alarms) and finds {pct(d["recall"])} of the defective ones (recall); precision '
            f'{pct(d["precision"])}, F1 {_fmt(d["f1"])}.{stale}</p>')


def _rel(path: Path) -> str:
    parts = Path(path).parts
    return os.fsdecode(Path(*parts[-3:])).encode("utf-8", "backslashreplace").decode("utf-8")
