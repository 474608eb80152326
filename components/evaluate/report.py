"""The evaluate stage's pictures and its one-page report (report.html: self-contained, opens offline)."""

from __future__ import annotations

import base64
import html as html_escape
import os
from pathlib import Path
from typing import Callable

import numpy as np

from schemas.dataset import IMAGE_SIDE, N_CLASSES

GALLERY = 36  # misclassified digits shown in errors.png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    os.replace(partial, path)


TRAINING = "training.png"


def histories(model_dir: Path) -> dict[str, Path]:
    """The per-epoch histories (history.csv) of a trained model's folder: the model's own, or each member's of an
    ensemble ({"model": ...} or {"member-00": ..., ...})."""
    found = {"model": model_dir / "history.csv"} if (model_dir / "history.csv").is_file() else {}
    for path in sorted(model_dir.glob("members/*/history.csv")):
        found[path.parent.name] = path
    return found


def training_png(found: dict[str, Path], path: Path) -> bool:
    """Loss and accuracy per epoch, train (solid) and val (dashed), for the model or each member; False (nothing
    written) when there is no history with an epoch in it (pca-svm trains without epochs)."""
    import csv

    curves = {}
    for name, history in found.items():
        with history.open(newline="") as fh:
            rows = [row for row in csv.DictReader(fh) if row.get("loss") not in (None, "")]
        if rows:
            curves[name] = rows
    if not curves:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, rows) in enumerate(curves.items()):
        epochs = [int(float(r["epoch"])) + 1 for r in rows]
        colour = colours[k % len(colours)]
        for ax, key in zip(axes, ("loss", "accuracy")):
            ax.plot(epochs, [float(r[key]) for r in rows], color=colour, label=f"{name} train")
            if rows[0].get(f"val_{key}") not in (None, ""):
                ax.plot(epochs, [float(r[f"val_{key}"]) for r in rows], color=colour, linestyle="--",
                        label=f"{name} val")
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(f"{key} per epoch (train solid, val dashed)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return True


def confusion_png(confusion: np.ndarray, path: Path) -> None:
    """The 10x10 confusion matrix: counts in each cell, rows true class, columns predicted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    shown = np.log1p(confusion)
    ax.imshow(shown, cmap="Blues")
    for true in range(N_CLASSES):
        for predicted in range(N_CLASSES):
            count = int(confusion[true, predicted])
            if count:
                ax.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
                        color="white" if shown[true, predicted] > shown.max() * 0.6 else "black")
    ax.set_xticks(range(N_CLASSES))
    ax.set_yticks(range(N_CLASSES))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(confusion) / max(1, confusion.sum())
    ax.set_title(f"confusion on the validation split (accuracy {accuracy:.2%})")
    _save(fig, path)


def errors_png(ids: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
               images_at: Callable[[np.ndarray], np.ndarray], path: Path) -> None:
    """The most confidently wrong validation digits: true class, predicted class and both probabilities. One
    image of the digits side by side with their captions under each (one axes: 0.59 s where 36 axes took 1.53 s,
    on 400 val images). images_at(sorted positions): those rows' images (only the shown ones are read)."""
    plt = _pyplot()
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:GALLERY]
    shown = dict(zip(np.sort(wrong).tolist(), images_at(np.sort(wrong)))) if len(wrong) else {}
    columns, side = 6, IMAGE_SIDE
    rows = max(1, int(np.ceil(len(wrong) / columns)))
    cell_w, cell_h = side + 22, side + 26  # a digit, and room for its three lines of caption below it
    canvas = np.zeros((rows * cell_h, columns * cell_w), np.uint8)
    fig, ax = plt.subplots(figsize=(columns * 1.6, rows * 1.9))
    for k, i in enumerate(wrong):
        top, left = (k // columns) * cell_h, (k % columns) * cell_w + 11
        canvas[top:top + side, left:left + side] = shown[int(i)]
        true, guess = int(labels[i]), int(predicted[i])
        ax.text(left + side / 2, top + side + 1, f"id {int(ids[i])}\ntrue {true} ({probabilities[i, true]:.2f})\n"
                f"pred {guess} ({probabilities[i, guess]:.2f})", fontsize=7, ha="center", va="top")
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"{len(np.flatnonzero(predicted != labels))} misclassified of {len(labels)} "
                 f"validation digits (most confident first)" if len(wrong) else "no misclassified validation digits",
                 fontsize=9)
    _save(fig, path)


def robustness_png(robustness: dict, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), sharey=True)
    for ax, (key, label) in zip(axes, (("rotation_degrees", "rotation (degrees)"), ("shift_pixels", "shift (pixels, diagonal)"),
                                       ("noise_sigma", "Gaussian noise (sigma / full ink)"))):
        levels = [float(k) for k in robustness[key]]
        ax.plot(levels, [100 * v for v in robustness[key].values()], marker="o")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    fig.suptitle("robustness of the model on the validation split")
    _save(fig, path)


def reliability_png(calibration: dict, path: Path) -> None:
    """The reliability diagram: accuracy against confidence per bin (a calibrated model is on the diagonal),
    and how many images fall in each bin."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    table = calibration["reliability"]
    centres = [(row["low"] + row["high"]) / 2 for row in table]
    width = 1 / calibration["bins"]
    top.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1, label="calibrated")
    top.bar(centres, [row["accuracy"] for row in table], width=width * 0.9, color="#4a7fb5", label="accuracy")
    top.plot([row["confidence"] for row in table], [row["accuracy"] for row in table], "o", color="#c0392b",
             markersize=4, label="mean confidence")
    top.set_ylabel("accuracy in the bin")
    top.set_ylim(0, 1.02)
    top.legend(loc="upper left")
    top.set_title(f"reliability on the validation split (ECE {calibration['ece']:.4f})")
    bottom.bar(centres, [row["images"] for row in table], width=width * 0.9, color="#888")
    bottom.set_yscale("log")
    bottom.set_xlabel("top probability (confidence)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    _save(fig, path)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'


def _training(out: Path) -> str:
    if not (out / TRAINING).is_file():
        return ""
    return f"<h2>Training curves</h2>{_img(out / TRAINING)}"


def _comparison(comparison: dict | None) -> str:
    """The paired comparison with the champion: who got which images right, the difference and its test."""
    if not comparison:
        return "<p>No champion yet: nothing to compare with.</p>"
    c = comparison
    return (f"<h2>Against champion version {html_escape.escape(str(c['champion_version']))}</h2>"
            f"<p>The same {c['images']:,} validation images, paired:</p><table>"
            "<tr><th></th><th>champion right</th><th>champion wrong</th></tr>"
            f"<tr><th>candidate right</th><td>{c['both_right']:,}</td><td>{c['candidate_only_right']:,}</td></tr>"
            f"<tr><th>candidate wrong</th><td>{c['champion_only_right']:,}</td><td>{c['both_wrong']:,}</td></tr></table>"
            f"<p>Accuracy {100 * c['candidate_accuracy']:.2f}% against {100 * c['champion_accuracy']:.2f}%: difference "
            f"<b>{100 * c['difference']:+.2f} points</b> (95 % CI {100 * c['ci95'][0]:+.2f} to {100 * c['ci95'][1]:+.2f}); "
            f"exact McNemar test on the {c['candidate_only_right'] + c['champion_only_right']:,} images they disagree "
            f"on: p = {c['p_value']:.3g}.</p>")


def _lineage(lineage: dict | None) -> str:
    """The seen-images section: the model's lineage chain and how many val and test images it has seen."""
    from components.lineage import describe_chain

    if not lineage:
        return ""
    if not lineage.get("known"):
        return ("<h2>Seen images</h2><p class=\"refused\">The model records no seen images (trained before digits "
                "kept them): whether it was trained on val or test images is not known.</p>")

    def row(split: str) -> str:
        o = lineage.get(split)
        if o is None:
            return f"<tr><th>{split}</th><td colspan=4>no {split} split</td></tr>"
        ids = ", ".join(map(str, o["example_ids"])) + (", ..." if o["seen"] > len(o["example_ids"]) else "")
        return (f"<tr class=\"{'refused' if o['seen'] else 'passed'}\"><th>{split}</th><td>{o['images']:,}</td>"
                f"<td>{o['exact']:,}</td><td>{o['shifted']:,}</td><td>{html_escape.escape(ids) or '-'}</td></tr>")
    incomplete = ("" if lineage.get("complete") else
                  "<p class=\"refused\">Part of the lineage is unknown: overlap is checked against the known part.</p>")
    return (f"<h2>Seen images</h2><p>The model and the models it was fine-tuned from were trained on "
            f"{lineage['seen_images']:,} distinct images: {html_escape.escape(describe_chain(lineage['chain']))}.</p>"
            f"{incomplete}<table><tr><th>split</th><th>images</th><th>seen (exact)</th><th>seen (shifted)</th>"
            f"<th>example ids</th></tr>{row('val')}{row('test')}</table>")


def _label_review(found: dict | None) -> str:
    """The model's errors beside the label review: those on images whose label the review doubts."""
    if not found:
        return ""
    def percent(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.2f}%"
    rows = "".join(
        f"<tr><th>{split}{' (reported only)' if split == 'test' else ''}</th><td>{part['errors']:,} of "
        f"{part['images']:,}</td><td>{part['errors_on_suspect_labels']:,}</td><td>{percent(part['accuracy'])}</td>"
        f"<td>{percent(part['accuracy_without_suspect_labels'])}</td></tr>" for split, part in found.items())
    examples = "".join(
        f"<tr><td>{split}</td><td>{e['id']}</td><td>{e['given_label']}</td><td>{e['model']}</td>"
        f"<td>{e['review_suggests']}</td></tr>" for split, part in found.items() for e in part["examples"])
    return ("<h2>Errors and doubted labels</h2><p>The review stage's suspects (<a href=\"../review/report.html\">label "
            "review</a>): an error on an image whose label it doubts is probably the label's, not the model's.</p>"
            "<table><tr><th>split</th><th>errors</th><th>on doubted labels</th><th>accuracy</th>"
            f"<th>without doubted labels</th></tr>{rows}</table>"
            + (f"<table><tr><th>split</th><th>id</th><th>label</th><th>model</th><th>review suggests</th></tr>{examples}"
               "</table>" if examples else ""))


def _scaling(scaling: dict | None) -> str:
    if not scaling:
        return "Not temperature-scaled (<code>--set evaluate.calibrate=true</code> fits a temperature on val and keeps it in the model)."
    return (f"Temperature-scaled (evaluate.calibrate): temperature <b>{scaling['temperature']:.3f}</b> fitted on these "
            f"validation images; ECE before <b>{scaling['ece_before']:.4f}</b>, after {scaling['ece_after']:.4f} "
            f"(<b>{scaling['ece_after_cross_fitted']:.4f}</b> with the temperature fitted on the other half of the "
            "images: the honest number).")


def _members(members: list[dict] | None, ensemble: float) -> str:
    if not members:
        return ""
    rows = "".join(f"<tr><td>{html_escape.escape(m['name'])}</td><td>{html_escape.escape(m['model'])}</td>"
                   f"<td>{m['seed']}</td><td>{100 * m['val_accuracy']:.2f}%</td>"
                   f"<td>{html_escape.escape(str(m.get('worker') or 'this process'))}</td></tr>" for m in members)
    return (f"<h2>Members</h2><p>The ensemble averages the probabilities of {len(members)} members; each alone on the "
            f"same images:</p><table><tr><th>member</th><th>model</th><th>seed</th><th>val accuracy</th>"
            f"<th>trained on</th></tr>{rows}<tr><th colspan=3>ensemble</th><th>{100 * ensemble:.2f}%</th><td></td>"
            "</tr></table>")


def html(metrics: dict, robustness: dict, path: Path, nav: str = "") -> None:
    """One self-contained page: the gate's decision, the metrics table, the training curves and the pictures;
    nav: links to the run's other pages (components.pages.nav)."""
    gate = metrics["gate"]
    rows = "".join(
        f"<tr><td>{c}</td><td>{m['precision']:.4f}</td><td>{m['recall']:.4f}</td><td>{m['f1']:.4f}</td>"
        f"<td>{m['support']}</td></tr>" for c, m in metrics["per_class"].items())
    sweep = "".join(
        f"<tr><th>{html_escape.escape(key)}</th>" + "".join(f"<td>{level}: {100 * v:.2f}%</td>" for level, v in values.items())
        + "</tr>" for key, values in robustness.items())
    out = path.parent
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>digits evaluation: {html_escape.escape(metrics['model'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} .passed{{color:#1a7f37}} .refused{{color:#cf222e}}
img{{max-width:100%;display:block;margin:1em 0}} nav a{{margin-right:1em}}</style></head><body>{nav}
<h1>Evaluation of <code>{html_escape.escape(metrics['model'])}</code></h1>
<p>Validation accuracy <b>{100 * metrics['val_accuracy']:.2f}%</b> on {metrics['val_rows']:,} validation digits.</p>
<p class="{'passed' if gate['passed'] else 'refused'}"><b>Gate {'passed' if gate['passed'] else 'refused'}</b>:
{html_escape.escape(gate['reason'])}</p>{_comparison(metrics.get('comparison'))}
{_lineage(metrics.get('lineage'))}{_members(metrics.get('members'), metrics['val_accuracy'])}
{_label_review(metrics.get('label_review'))}
{_training(out)}
<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{rows}</table>
<h2>Confusion</h2>{_img(out / 'confusion.png')}
<h2>Misclassified digits</h2>{_img(out / 'errors.png')}
<h2>Robustness</h2>{_img(out / 'robustness.png')}<table>{sweep}</table>
<h2>Calibration</h2><p>Expected calibration error <b>{metrics['calibration']['ece']:.4f}</b>: mean confidence
{100 * metrics['calibration']['mean_confidence']:.2f}% against accuracy {100 * metrics['calibration']['accuracy']:.2f}%
({metrics['calibration']['bins']} bins). Label smoothing makes a model under-confident (bars above the diagonal).
{_scaling(metrics['calibration'].get('scaling'))}
<code>digits predict --min-confidence P</code> answers <code>?</code> below P: pick P where the bars fall below the
accuracy you need.</p>{_img(out / 'reliability.png')}
</body></html>
"""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(page)
    os.replace(partial, path)
