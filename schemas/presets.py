"""Presets: named sets of config overrides, so a user need not know the numbers (`digits run PIPELINE
--preset NAME`; `--set` after it still overrides single fields). Each is measured in the README.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    help: str
    overrides: tuple[str, ...]


PRESETS: tuple[Preset, ...] = (
    Preset("robust", "noise-robust training: random backgrounds, pixel noise, contrast and brightness jitter on "
                     "top of the usual rotation/shift/zoom (a base for noisy scans)",
           ("train.background_noise=1", "train.pixel_noise=0.3", "train.contrast=0.2", "train.brightness=0.1")),
)

_BY_NAME = {preset.name: preset for preset in PRESETS}


def preset(name: str) -> Preset:
    from schemas.errors import ConfigError

    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; known: {', '.join(_BY_NAME)}") from None
