"""The figure cache of the evaluation CLIs: every measured figure by key, with what it scored.

A figure records the digest of the CAMA checkpoint it scored (``model``) and, if it fine-tunes,
the adaptation recipe it was measured with (``recipe``, :func:`recipe_id`); it is reused only for
the same checkpoint and recipe, so an interrupted run resumes and a new model or recipe is
measured anew.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cama.adapt import FinetuneConfig
from cama.runtime import atomic_write


def recipe_id(ft: FinetuneConfig) -> str:
    """Every setting of a recipe, e.g. ``"alpha=0.5,batch_size=32,..."``: what a fine-tuned figure
    was measured with. ``decay_fraction`` is left out under a constant step, where it does nothing."""
    settings = ft.as_dict()
    if ft.lr_schedule != "cosine":
        settings.pop("decay_fraction")
    return ",".join(f"{name}={value}" for name, value in sorted(settings.items()))


# the keys of figures that fine-tune: ``..._ft``, ``..._ft_v``, ``clean_after_ft_...``, fig. 8's
# ``.frac.`` and the promotion gate's verdicts
FINE_TUNED_KEY = re.compile(r"_ft($|[._])|\.frac\.|_gate_accepted$")


def entry_recipe(key: str, entry: dict[str, Any]) -> str | None:
    """The fine-tuning recipe figure ``key`` was measured with (:func:`recipe_id`), None for a
    figure without fine-tuning."""
    return str(entry["recipe"]) if "recipe" in entry else None


class MissingModelError(FileNotFoundError):
    """A baseline checkpoint the figure needs does not exist (yet): the figure is skipped."""


class Cache:
    """Figures measured so far, keyed by metric name; written after every new figure.

    A figure that scores a CAMA records the digest of the checkpoint it scored (``model``): it is
    reused only for that checkpoint, so a retrained model never inherits another model's figures.
    Baseline figures (DNN, TENT) carry no digest.
    """

    def __init__(self, path: Path, force: bool) -> None:
        self.path = path
        self.context: dict[str, Any] = {}  # stored with every new entry (device, scoring limit)
        self.data: dict[str, dict[str, Any]] = {}
        if path.exists() and not force:
            self.data = json.loads(path.read_text())

    def fresh(self, key: str, model: str | None = None, recipe: str | None = None) -> bool:
        """Whether ``key`` is cached and was measured on ``model`` (None: a baseline figure) and,
        for a fine-tuned figure, with the fine-tuning ``recipe`` (:func:`recipe_id`)."""
        entry = self.data.get(key)
        if entry is None or entry.get("model") != model:
            return False
        return recipe is None or entry.get("recipe") == recipe

    def recipe_of(self, key: str) -> str | None:
        """The fine-tuning recipe of the cached figure ``key`` (:func:`entry_recipe`)."""
        return entry_recipe(key, self.data[key])

    def forget_other(self, model: str, keep: Callable[[str], bool]) -> list[str]:
        """Drop the figures measured on another checkpoint than ``model``, except where ``keep(key)``."""
        stale = [k for k, v in self.data.items() if v.get("model") not in (None, model) and not keep(k)]
        for key in stale:
            del self.data[key]
        return stale

    def forget_fine_tuned(self, model: str) -> list[str]:
        """Drop the fine-tuned figures measured on ``model`` (to measure them again, e.g. on
        another device); the figures without fine-tuning stay."""
        tuned = [k for k, v in self.data.items() if v.get("model") == model and entry_recipe(k, v)]
        for key in tuned:
            del self.data[key]
        return tuned

    def merge(self, other: dict[str, dict[str, Any]], model: str, recipe: str | None = None) -> int:
        """Take the figures another run of this command measured (a parallel process's cache):
        those this cache lacks, and those measured on ``model`` that replace older ones, except
        that a figure fine-tuned with ``recipe`` is never replaced by one of another recipe (two
        parallel runs seeded from one cache each hold the other's figures in their old recipe)."""
        taken = 0
        for key, entry in other.items():
            ours = self.data.get(key)
            if ours is not None and (
                entry.get("model") != model
                or ours == entry
                or (recipe is not None and entry_recipe(key, ours) == recipe != entry_recipe(key, entry))
            ):
                continue
            self.data[key] = entry
            taken += 1
        self.save()
        return taken

    def put(self, key: str, entry: dict[str, Any], *, show: bool = False) -> None:
        """Cache ``entry`` under ``key`` (and print its value if ``show``)."""
        self.data[key] = entry
        self.save()
        if show:
            print(f"{key:48s} {float(entry['value']):.4f}", flush=True)

    def save(self) -> None:
        """Write the cache atomically: an interrupted run leaves the old file or the new one."""
        atomic_write(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")

    def get(
        self,
        key: str,
        compute: Callable[[], float],
        *,
        model: str | None = None,
        recipe: str | None = None,
        **info: Any,
    ) -> float:
        """The cached figure, or ``compute()`` it and cache it (with ``recipe`` if it fine-tunes)."""
        if self.fresh(key, model, recipe):
            return float(self.data[key]["value"])
        t0 = time.perf_counter()
        try:
            value = compute()
        except MissingModelError as exc:
            print(f"{key:48s} skipped: {exc}", flush=True)
            return float("nan")
        seconds = round(time.perf_counter() - t0, 1)
        tag = {} if model is None else {"model": model}
        if recipe is not None:
            tag["recipe"] = recipe
        self.put(key, {"value": value, "seconds": seconds, **self.context, **tag, **info})
        print(f"{key:48s} {value:.4f}  ({self.data[key]['seconds']}s)", flush=True)
        return value
