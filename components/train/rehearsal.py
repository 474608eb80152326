"""Rehearsal (transfer.rehearse): images of a base model's own training run, fine-tuned on beside the run's train
split (components.transfer; its ensembles' members too, components.train.ensemble)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from components import records
from schemas.artifacts import Converted


@dataclass(frozen=True)
class Rehearsal:
    """Images of the base model's own training run to fine-tune on beside the run's train split."""

    converted: Converted  # the base run's convert output (its train split)
    share: float  # of that split, drawn at random (seeded)
    noise_background: bool  # draw each image's background as uniform noise (a noise-background source)
    run_id: str  # the base run, for the record

    @property
    def rows(self) -> int:
        return int(round(self.share * self.converted.counts.get("train", 0)))

    def describe(self) -> dict[str, Any]:
        return {"run": self.run_id, "data": self.converted.fingerprint, "share": self.share,
                "noise_background": self.noise_background, "rows": self.rows}

    def arrays(self, seed: int) -> records.Arrays:
        """The rehearsal images, the same for the same seed (a resumed fine-tuning sees the same ones).
        Their ids are negative: -1 - their row in the base's train split."""
        rng = np.random.default_rng([seed, 7])
        rows = np.sort(rng.permutation(self.converted.counts.get("train", 0))[:self.rows])
        picked = records.pick(self.converted.files("train"), rows)  # streamed: the base split is never held
        images = picked.images
        if self.noise_background:  # make_noisy's recipe: a pixel with no ink becomes uniform noise
            images = np.where(images == 0, rng.integers(0, 256, images.shape, dtype=np.uint8), images)
        return records.Arrays(ids=-1 - rows.astype(np.int64), labels=picked.labels, images=images)
