"""Exploratory summaries a person looks at first: label counts, class means, intensities, duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from components.ingest.splits import SplitData
from schemas.dataset import N_CLASSES, N_PIXELS, PIXEL_MAX, Split

_EXAMPLES = 10  # duplicate pairs listed in duplicates.json


def write(splits: dict[Split, SplitData], out: Path) -> dict:
    """Write PNG + JSON summaries into out; return the JSON-able summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    counts = {split.value: (np.bincount(data.labels, minlength=N_CLASSES).tolist() if data.labels is not None
                            else None) for split, data in splits.items()}
    _dump(out / "label_counts.json", counts)
    _label_counts_png(plt, counts, out / "label_counts.png")
    train = splits[Split.train]
    _class_means_png(plt, train, out / "class_means.png")
    histogram = {split.value: np.bincount(data.pixels.reshape(-1), minlength=PIXEL_MAX + 1).tolist()
                 for split, data in splits.items()}
    _dump(out / "intensity_histogram.json", histogram)
    _histogram_png(plt, histogram, out / "intensity_histogram.png")
    duplicates = find_duplicates(train, splits.get(Split.test))
    _dump(out / "duplicates.json", duplicates)
    _page(out, splits, counts, histogram, duplicates)
    return {"label_counts": counts, "duplicates": {k: v for k, v in duplicates.items() if not k.endswith("examples")}}


PAGE = "index.html"


def _page(out: Path, splits: dict[Split, SplitData], counts: dict, histogram: dict, duplicates: dict) -> None:
    """eda/index.html: the pictures with their numbers (no scripts; opens offline)."""
    import html

    from components import pages

    e = html.escape
    labelled = {k: v for k, v in counts.items() if v is not None}
    head = "".join(f"<th>{d}</th>" for d in range(N_CLASSES))
    rows = "".join(f"<tr><th>{e(split)}</th>" + "".join(f"<td>{v:,}</td>" for v in values)
                   + f"<td><b>{sum(values):,}</b></td><td>{min(values) / max(max(values), 1):.2f}</td></tr>"
                   for split, values in labelled.items())
    unlabelled = [split for split, values in counts.items() if values is None]
    intensity = "".join(
        f"<tr><th>{e(split)}</th><td>{len(splits[Split(split)].pixels):,}</td>"
        f"<td>{100 * values[0] / max(sum(values), 1):.1f} %</td>"
        f"<td>{100 * sum(values[128:]) / max(sum(values), 1):.1f} %</td>"
        f"<td>{np.dot(np.arange(PIXEL_MAX + 1), values) / max(sum(values), 1):.1f}</td></tr>"
        for split, values in histogram.items())
    examples = "".join(f"<li>train ids {', '.join(map(str, group[:6]))}</li>" for group in duplicates["train_examples"])
    examples += "".join(f"<li>train ids {', '.join(map(str, pair['train_ids'][:4]))} = test ids "
                        f"{', '.join(map(str, pair['test_ids'][:4]))}</li>" for pair in duplicates["train_test_examples"])
    body = f"""<h1>Exploratory data analysis</h1>
<h2>Label counts</h2><table><tr><th>split</th>{head}<th>rows</th><th>smallest / largest class</th></tr>{rows}</table>
{f"<p>Unlabelled: {e(', '.join(unlabelled))}.</p>" if unlabelled else ""}
<img alt="label counts" src="label_counts.png">
<h2>Mean training image per class</h2><p>What the average digit of each class looks like: a blurred, upright,
centred digit is what the model expects; a sideways or off-centre mean points at transposed or shifted images.</p>
<img alt="class means" src="class_means.png">
<h2>Pixel intensities</h2><table><tr><th>split</th><th>images</th><th>background (0)</th><th>ink (&ge; 128)</th>
<th>mean intensity</th></tr>{intensity}</table><img alt="intensity histogram" src="intensity_histogram.png">
<h2>Duplicates</h2><p>{duplicates["train_duplicate_rows"]:,} train rows repeat another train image
({duplicates["train_duplicate_groups"]:,} groups); {duplicates["train_test_shared_rows"]:,} test rows are also train
images ({duplicates["train_test_shared_groups"]:,} groups): validation checks that none leak.</p>
{f"<ul>{examples}</ul>" if examples else ""}
<p>The numbers as JSON: <a href="label_counts.json">label_counts.json</a>,
<a href="intensity_histogram.json">intensity_histogram.json</a>, <a href="duplicates.json">duplicates.json</a>.</p>"""
    pages.write(out / PAGE, "digits: exploratory data analysis", body, pages.nav(out.parent.parent, "ingest/eda"))


def find_duplicates(train: SplitData, test: SplitData | None) -> dict:
    """Exact-duplicate images within train and shared by train and test (ids of example pairs)."""
    rows = [train.pixels.reshape(len(train.pixels), N_PIXELS)]
    if test is not None:
        rows.append(test.pixels.reshape(len(test.pixels), N_PIXELS))
    flat = np.ascontiguousarray(np.concatenate(rows))
    keys = flat.view(np.dtype((np.void, N_PIXELS))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    n_train = len(train.pixels)
    is_train = np.arange(len(keys)) < n_train
    repeated = counts[inverse] > 1
    order = np.argsort(inverse[repeated], kind="stable")
    members, groups = np.flatnonzero(repeated)[order], inverse[repeated][order]
    within, across = [], []
    within_rows = across_rows = 0
    for group in np.split(members, np.flatnonzero(np.diff(groups)) + 1) if len(members) else []:
        tr, te = group[is_train[group]], group[~is_train[group]]
        if len(tr) > 1:
            within_rows += len(tr) - 1
            within.append([int(train.ids[i]) for i in tr])
        if len(tr) and len(te):
            across_rows += len(te)
            across.append({"train_ids": [int(train.ids[i]) for i in tr],
                           "test_ids": [int(test.ids[i - n_train]) for i in te]})
    return {"train_duplicate_rows": within_rows, "train_duplicate_groups": len(within),
            "train_test_shared_rows": across_rows, "train_test_shared_groups": len(across),
            "train_examples": within[:_EXAMPLES], "train_test_examples": across[:_EXAMPLES]}


def _label_counts_png(plt, counts: dict, path: Path) -> None:
    labelled = {k: v for k, v in counts.items() if v is not None}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(labelled), 1)
    for k, (split, values) in enumerate(labelled.items()):
        ax.bar(np.arange(N_CLASSES) + k * width, values, width, label=f"{split} ({sum(values):,})")
    ax.set_xticks(np.arange(N_CLASSES) + width * (len(labelled) - 1) / 2, [str(d) for d in range(N_CLASSES)])
    ax.set_xlabel("digit")
    ax.set_ylabel("rows")
    ax.set_title("Label counts per split")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=max(len(labelled), 1), frameon=False)  # below
    _save(plt, fig, path)  # the axes, never over a bar


def _class_means_png(plt, train: SplitData, path: Path) -> None:
    fig, axes = plt.subplots(2, 5, figsize=(7.5, 3.9))
    for digit, ax in enumerate(axes.ravel()):
        chosen = train.pixels[train.labels == digit] if train.labels is not None else train.pixels[:0]
        mean = chosen.mean(axis=0) if len(chosen) else np.zeros(train.pixels.shape[1:])
        ax.imshow(mean, cmap="gray", vmin=0, vmax=PIXEL_MAX)
        ax.set_title(f"{digit} (n={len(chosen):,})", fontsize=9)
        ax.axis("off")
    fig.suptitle("Mean training image per class")
    _save(plt, fig, path)


def _histogram_png(plt, histogram: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for split, values in histogram.items():
        total = max(sum(values), 1)
        ax.plot(np.arange(PIXEL_MAX + 1), np.asarray(values) / total, label=split)
    ax.set_yscale("log")
    ax.set_xlabel("pixel intensity (0 background .. 255 ink)")
    ax.set_ylabel("fraction of pixels")
    ax.set_title("Pixel-intensity histogram")
    ax.legend()
    _save(plt, fig, path)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _dump(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")
