"""A model card per registered version (what TFX users know from Model Card Toolkit, with no extra
install): the page a reviewer reads before approving a version.

`write(out_dir, facts)` writes model_card.md (text and tables, the pictures beside it by name) and
model_card.html (self-contained: the pictures inlined; opens offline, no scripts). Sections: model
details, intended use, data (sources, split sizes, fingerprints), training configuration, evaluation
(val accuracy with its 95 % interval, the gate, the paired comparison), per-class table, robustness,
calibration, lineage (the chain of models and the images they saw, and this run's overlaps with them),
limitations. `facts` is gathered by the register stage from the run's artifacts (flows.stages).
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any

MARKDOWN = "model_card.md"
HTML = "model_card.html"
PICTURES = ("training.png", "robustness.png", "reliability.png", "confusion.png")
SECTIONS = ("Model details", "Intended use", "Data", "Training", "Evaluation", "Per class", "Robustness",
            "Calibration", "Lineage", "Limitations")


def wilson(accuracy: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion measured on n images."""
    if n <= 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f} %"


def _sections(f: dict[str, Any]) -> list[tuple[str, list[str | list[list[str]]], list[str]]]:
    """(title, blocks, pictures) per section; a block is a paragraph or a table (rows, the first the header)."""
    m = f["metrics"]
    low, high = wilson(m["val_accuracy"], m["val_rows"])
    gate, lineage, calibration = m["gate"], m.get("lineage") or {}, m["calibration"]
    comparison = m.get("comparison")
    training = f["training"]
    robustness = f.get("robustness") or {}
    details = [[["field", "value"], ["registered model", f["name"]], ["version", f["version"]],
                ["champion", "yes" if f["promoted"] else "no"], ["architecture", training["model"]],
                ["parameters", f"{training['parameters']:,}" if training.get("parameters") else "-"],
                ["run", f["run_id"]], ["code version", f["code_version"]], ["model sha256", f["model_sha256"]],
                ["registered", f["registered_at"]]]]
    intended = [f"Classifying one handwritten digit (0-9) per image, as {f['source_title']} presents them: "
                "28x28 grayscale, the digit roughly centred, light ink on a dark background (other images are "
                "converted to that canonical form by digits' readers). Read its answers with their probabilities: "
                "`digits predict --min-confidence P` answers `?` below P (see Calibration).",
                "Not for: several digits or letters in one image, photographs of documents without segmentation, "
                "or any decision about a person."]
    data = [[["split", "images"], *[[k, f"{v:,}"] for k, v in f["counts"].items()]],
            f"Pipeline `{f['pipeline']}`; converted data fingerprint `{f['data_fingerprint']}`.",
            [["input file", "sha256"], *[[k, v] for k, v in f["inputs"].items()]] if f["inputs"] else
            "Input: downloaded (no local file fingerprint)."]
    train_rows = [["setting", "value"], *[[k, str(v)] for k, v in training["config"].items()]]
    origin = (f"Fine-tuned from `{training['base']}` ({training['transfer_mode']})." if training.get("base")
              else "Trained from random weights.")
    processor = f" ({training['processor']})" if training.get("processor") else ""  # "": trained before it was recorded
    epochs = f"{training['epochs']} epoch{'s' if training['epochs'] != 1 else ''}"
    train = [f"{origin} {epochs} on {training['device']}{processor}, {training['seconds']:.0f} s.", train_rows]
    evaluation = [f"Validation accuracy **{_pct(m['val_accuracy'])}** on {m['val_rows']:,} images the model was not "
                  f"trained on (95 % interval {_pct(low)} to {_pct(high)}, Wilson).",
                  f"Gate ({gate['policy']}, alpha {gate['alpha']}): **{'passed' if gate['passed'] else 'refused'}** - "
                  f"{gate['reason']}"]
    if comparison:
        evaluation.append([["paired with champion", "value"],
                           ["champion version", str(comparison["champion_version"])],
                           ["both right / only candidate / only champion / both wrong",
                            f"{comparison['both_right']:,} / {comparison['candidate_only_right']:,} / "
                            f"{comparison['champion_only_right']:,} / {comparison['both_wrong']:,}"],
                           ["difference (95 % CI)", f"{100 * comparison['difference']:+.2f} pt "
                            f"({100 * comparison['ci95'][0]:+.2f} to {100 * comparison['ci95'][1]:+.2f})"],
                           ["McNemar exact p", f"{comparison['p_value']:.3g}"]])
    per_class = [[["class", "precision", "recall", "F1", "support"],
                  *[[c, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", str(v["support"])]
                    for c, v in m["per_class"].items()]]]
    sweep = [[["perturbation", *levels], *[[k, *[_pct(v[level], 1) for level in levels]]]]
             for k, v in robustness.items() for levels in [list(v)]]
    calib = [f"Expected calibration error {calibration['ece']:.4f}: mean confidence {_pct(calibration['mean_confidence'])} "
             f"against accuracy {_pct(calibration['accuracy'])}. Bars above the diagonal: the model is right more "
             "often than it says (under-confident); below: over-confident."]
    scaling = calibration.get("scaling")
    if scaling:
        calib.append(f"Temperature scaling is inside this model (temperature {scaling['temperature']:.3f}, fitted on the "
                     f"val split): ECE {scaling['ece_before']:.4f} before, {scaling['ece_after']:.4f} after, "
                     f"{scaling['ece_after_cross_fitted']:.4f} cross-fitted (fitted on one half, measured on the other).")
    else:
        calib.append("Not temperature-scaled.")
    chain = lineage.get("chain") or []
    if lineage.get("known"):
        rows = [["model", "images seen", "data"]]
        for link in chain:
            rows.append([link.get("model") or f"this version (run {link.get('run', '?')})",
                         "unknown" if link.get("images") is None else f"{link['images']:,}", link.get("data", "-")])
        overlaps = [["this run's split", "images", "seen exactly", "seen shifted", "example ids"]]
        for split in ("val", "test"):
            o = lineage.get(split)
            if o:
                overlaps.append([split, f"{o['images']:,}", f"{o['exact']:,}", f"{o['shifted']:,}",
                                 ", ".join(map(str, o["example_ids"])) or "-"])
        lines = [f"Trained on {lineage['seen_images']:,} distinct images through this chain "
                 f"({'complete' if lineage.get('complete') else 'INCOMPLETE: a base model did not record its images'}); "
                 "fingerprints kept with this version as seen.npz.", rows, overlaps]
    else:
        lines = ["This model records no seen images (trained before digits kept them)."]
    limits = [f"Measured on {m['val_rows']:,} validation images drawn from the same data as its training images; "
              "new writers, scanners or preprocessing can do worse."]
    for key, level, words in (("rotation_degrees", "30", "rotated 30 degrees"), ("shift_pixels", "4", "shifted 4 pixels"),
                              ("noise_sigma", "0.3", "with noise of sigma 0.3")):
        if level in robustness.get(key, {}):
            limits.append(f"Accuracy on validation digits {words}: {_pct(robustness[key][level], 1)}.")
    if lineage.get("val") and lineage["val"]["seen"]:
        limits.append(f"WARNING: {lineage['val']['seen']:,} validation images were seen in training (allowed by "
                      "evaluate.allow_seen_val): the validation score is optimistic.")
    if lineage.get("test") and lineage["test"]["seen"]:
        limits.append(f"WARNING: {lineage['test']['seen']:,} of {lineage['test']['images']:,} test images were seen "
                      "in training: a score on that test set overstates accuracy on new digits.")
    return [("Model details", details, []), ("Intended use", intended, []), ("Data", data, []),
            ("Training", train, ["training.png"]), ("Evaluation", evaluation, []), ("Per class", per_class, ["confusion.png"]),
            ("Robustness", sweep, ["robustness.png"]), ("Calibration", calib, ["reliability.png"]),
            ("Lineage", lines, []), ("Limitations", limits, [])]


def _markdown(f: dict[str, Any], pictures: dict[str, Path]) -> str:
    out = [f"# Model card: {f['name']} version {f['version']}", ""]
    for title, blocks, shown in _sections(f):
        out += [f"## {title}", ""]
        for block in blocks:
            if isinstance(block, str):
                out += [block, ""]
            else:
                out += ["| " + " | ".join(block[0]) + " |", "|" + "---|" * len(block[0])]
                out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in block[1:]]
                out.append("")
        out += [f"![{name}]({name})" for name in shown if name in pictures] + ([""] if shown else [])
    return "\n".join(out)


def _bold(text: str) -> str:
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts)).replace("`", "")


def _html(f: dict[str, Any], pictures: dict[str, Path]) -> str:
    body = []
    for title, blocks, shown in _sections(f):
        body.append(f'<section id="{title.lower().replace(" ", "-")}"><h2>{html.escape(title)}</h2>')
        for block in blocks:
            if isinstance(block, str):
                body.append(f"<p>{_bold(block)}</p>")
            else:
                head = "".join(f"<th>{html.escape(c)}</th>" for c in block[0])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                               for row in block[1:])
                body.append(f"<table><tr>{head}</tr>{rows}</table>")
        for name in shown:
            if name in pictures:
                data = base64.b64encode(pictures[name].read_bytes()).decode()
                body.append(f'<img alt="{name}" src="data:image/png;base64,{data}">')
        body.append("</section>")
    title = f"Model card: {f['name']} version {f['version']}"
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
            "img{max-width:100%;display:block;margin:1em 0}"
            "nav{margin-bottom:1em;padding-bottom:.5em;border-bottom:1px solid #ddd} nav a{margin-right:1.2em}"
            "</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{''.join(body)}</body></html>\n")


def add_nav(page: Path, nav_html: str) -> None:
    """Put a run's links bar (components.pages.nav) at the top of the HTML card in its run folder; the copies
    attached to the registry and the MLflow run are the card alone (relative links would lead nowhere there)."""
    from schemas.runs import write_text_atomic

    write_text_atomic(page, page.read_text(encoding="utf-8").replace("<body>", f"<body>{nav_html}", 1))


def write(out_dir: Path, facts: dict[str, Any], picture_dir: Path) -> list[Path]:
    """model_card.md, model_card.html and the pictures the Markdown names, into out_dir (each file written
    under a temporary name and renamed). Returns the files written."""
    import shutil

    from schemas.runs import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = {name: picture_dir / name for name in PICTURES if (picture_dir / name).is_file()}
    written = []
    for name, source in pictures.items():
        partial = out_dir / f".{name}.partial"
        shutil.copyfile(source, partial)
        os.replace(partial, out_dir / name)
        written.append(out_dir / name)
    for name, text in ((MARKDOWN, _markdown(facts, pictures)), (HTML, _html(facts, pictures))):
        write_text_atomic(out_dir / name, text)
        written.append(out_dir / name)
    return written
