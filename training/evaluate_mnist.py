"""Reproduce the paper's MNIST figures as numbers, plots and JSON (figs. 1, 7, 8, 9, 10 + noise).

    python -m training.evaluate_mnist                       # everything, resuming from the cache
    python -m training.evaluate_mnist --sections clean fig7 --ranges 0.3 0.5
    python -m training.evaluate_mnist --merge run1/mnist_eval.json run2/mnist_eval.json --sections

Protocol (appendix C): fine-tuning uses the unlabelled "adapt" half of the manipulated test set
(minus ``--gate-holdout`` images kept for the promotion gate's held-out ELBO(x)); accuracy is
reported on the other half. Every measured figure is cached in ``docs/results/mnist_eval.json``
(so an interrupted run resumes; a fine-tuned figure records its recipe, :func:`recipe_id`, and is
measured again under another one, e.g. ``--ft-average tail``), then written as flat keys into
``docs/results/metrics.json``, as tables in ``docs/results/mnist.md`` and as plots beside them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cama.adapt import FinetuneConfig, GateConfig, gate_evaluation, promotion_gate
from cama.checkpoint import load_checkpoint, sha256_file
from cama.image_model import ImageCama
from training.data import Mnist, Split, load_mnist
from training.experiment import (
    cama_accuracy,
    finetuned,
    halves,
    manipulated_halves,
    replay_set,
    resolve_device,
    variant,
)
from training.metrics import update_metrics
from training.train_cama import validation_split

RESULTS = Path("docs/results")
RANGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
SHIFTS = {"vshift": "v", "hshift": "h"}
VARIANTS = {"cama": "transform", "cama_paper": "additive"}
UNSEEN = (("rotation", 30.0), ("contrast", 0.4), ("blur", 1.0), ("saltpepper", 0.1))
SECTIONS = ("clean", "fig1", "fig7", "noise", "unseen", "fig8", "fig9", "fig10", "ablation", "tent_lr")
TENT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # TENT's own default, Adam 1e-3, in the middle


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (stored with every cached figure)."""

    k: int = 10
    score_limit: int | None = None
    gate_holdout: int = 500
    replay: int = 5000
    canary: int = 1000
    # Adam 1e-3, constant for the first 80% of the steps, then half a cosine to zero over the last
    # 20%: the constant step's adaptation with a settled last iterate (docs/m_pathway.md, "A step
    # that settles only at the end"); figures measured before it carry ``LEGACY_RECIPE``
    ft: FinetuneConfig = field(
        default_factory=lambda: FinetuneConfig(
            lr=1e-3,
            epochs=2,
            batch_size=32,
            alpha=0.5,
            bf16=True,
            lr_schedule="cosine",
            decay_fraction=0.2,
        )
    )


def recipe_id(ft: FinetuneConfig) -> str:
    """The fine-tuning settings that differ from :class:`FinetuneConfig`'s defaults, e.g.
    ``"batch_size=32,bf16=True,epochs=2"``: the recipe a fine-tuned figure was measured with. A new
    option with a default value leaves the recipes measured before it unchanged."""
    default = FinetuneConfig()
    # options that only act under another one's setting are left out where they do not act
    inert = {
        "decay_fraction": ft.lr_schedule != "cosine",
        "average_fraction": ft.average != "tail",
    }
    return ",".join(
        f"{f.name}={getattr(ft, f.name)}"
        for f in sorted(fields(ft), key=lambda f: f.name)
        if getattr(ft, f.name) != getattr(default, f.name) and not inert.get(f.name, False)
    )


# what every fine-tuned figure cached before recipes were recorded was measured with
LEGACY_RECIPE = recipe_id(FinetuneConfig(lr=1e-3, epochs=2, batch_size=32, alpha=0.5, bf16=True))


# the keys of figures that fine-tune: ``..._ft``, ``..._ft_v``, ``clean_after_ft_...``, fig. 8's
# ``.frac.`` and the promotion gate's verdicts
FINE_TUNED_KEY = re.compile(r"_ft($|[._])|\.frac\.|_gate_accepted$")


def entry_recipe(key: str, entry: dict[str, Any]) -> str | None:
    """The fine-tuning recipe figure ``key`` was measured with, None for a figure without
    fine-tuning (a fine-tuned figure cached before recipes were recorded has ``LEGACY_RECIPE``)."""
    if "recipe" in entry:
        return str(entry["recipe"])
    return LEGACY_RECIPE if FINE_TUNED_KEY.search(key) else None


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
        return recipe is None or entry.get("recipe", LEGACY_RECIPE) == recipe

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

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.data[key] = entry
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")

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


class Evaluator:
    """Holds the data, the models and the cache of one evaluation run."""

    def __init__(self, args: argparse.Namespace, cfg: EvalConfig) -> None:
        self.args = args
        self.cfg = cfg
        self.recipe = recipe_id(cfg.ft)
        self.mnist: Mnist = load_mnist(args.data_dir)
        self.out = Path(args.out_dir)
        self.cache = Cache(self.out / "mnist_eval.json", args.force)
        self.cache.context = {"device": args.device}
        if cfg.score_limit is not None:
            self.cache.context["n_score"] = cfg.score_limit
        self.device = resolve_device(args.device)
        clean, meta = load_checkpoint(args.checkpoint)
        if not isinstance(clean, ImageCama):
            raise SystemExit(f"{args.checkpoint} is not an image CAMA checkpoint")
        self.clean = clean.to(self.device)
        self.clean_meta = meta
        # fine-tuned weights are cached per clean checkpoint: a retrained model never reuses them
        self.digest = sha256_file(args.checkpoint)[:12]
        self.ft_dir = Path(args.ft_cache) / self.digest
        for path in args.merge:
            taken = self.cache.merge(json.loads(Path(path).read_text()), self.digest, self.recipe)
            print(f"merged {taken} figures from {path}", flush=True)
        stale = self.cache.forget_other(self.digest, keep=lambda key: key.startswith("mnist.fig10."))
        if stale:
            print(f"dropped {len(stale)} figures measured on another checkpoint", flush=True)
        if args.again_ft:
            tuned = self.cache.forget_fine_tuned(self.digest)
            print(f"dropped {len(tuned)} fine-tuned figures to measure them again", flush=True)
            self.cache.save()
        self.replay = replay_set(self.mnist, cfg.replay)
        _, val = validation_split(self.mnist.train, 0.05, 0)
        n_canary = cfg.canary
        self.canary = (
            torch.from_numpy(val.x[:n_canary]).to(self.device),
            torch.from_numpy(val.y[:n_canary]).to(self.device),
        )
        _, score_idx = halves(self.mnist.test)
        self.clean_score = Split(self.mnist.test.x[score_idx], self.mnist.test.y[score_idx])
        self.baselines: dict[str, Any] = {}

    # --- models -------------------------------------------------------------------------------
    def baseline(self, name: str) -> Any:
        """A trained baseline by name (``dnn``, ``dnn_aug_v``, ``dnn_aug_h``, ``bncnn``)."""
        from training.baselines import load_baseline

        if name not in self.baselines:
            path = getattr(self.args, name)
            if not Path(path).exists():
                raise MissingModelError(f"no baseline checkpoint {path}")
            self.baselines[name] = load_baseline(path)[0].to(self.device).eval()
        return self.baselines[name]

    def ft_model(
        self,
        name: str,
        pathway: str,
        adapt_x: np.ndarray,
        *,
        base: ImageCama | None = None,
        zero_q_m: bool = False,
    ) -> tuple[ImageCama, dict[str, Any]]:
        """Fine-tune ``base`` (default: the clean model), or load its cached fine-tuned weights,
        and gate the adapted model."""
        base = self.clean if base is None else base
        path = self.ft_dir / f"ft_{name}.pt"
        n_gate = self.cfg.gate_holdout
        train_x, heldout = adapt_x[n_gate:], torch.from_numpy(adapt_x[:n_gate]).to(self.device)
        saved = torch.load(path, weights_only=False, map_location=self.device) if path.exists() else None
        if saved is not None and not self.args.force and same_recipe(saved["info"].get("ft"), self.cfg.ft):
            model = variant(base, pathway)
            model.load_state_dict(saved["state_dict"])
            return model.eval(), saved["info"]
        model, seconds = finetuned(
            base, pathway, self.replay, train_x, self.cfg.ft, reinit_q_m=base is self.clean, zero_q_m=zero_q_m
        )
        gate_cfg = GateConfig(k=self.cfg.k)
        before = gate_evaluation(variant(base, pathway), *self.canary, heldout, gate_cfg)
        after = gate_evaluation(model, *self.canary, heldout, gate_cfg)
        decision = promotion_gate(before, after, gate_cfg)
        info = {"finetune_seconds": seconds, "gate": decision.as_dict(), "ft": asdict(self.cfg.ft)}
        print(
            f"  {name}: fine-tuned in {seconds:.0f}s, gate {'accepts' if decision.accepted else 'REJECTS'} "
            f"{list(decision.reasons)}",
            flush=True,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "info": info}, path)
        return model.eval(), info

    # --- scoring ------------------------------------------------------------------------------
    def limit(self, split: Split) -> Split:
        """The first ``--score-limit`` items of a split (every method scores the same items)."""
        n = self.cfg.score_limit
        return split if n is None else Split(split.x[:n], split.y[:n])

    def cama(self, model: ImageCama, split: Split) -> float:
        return cama_accuracy(model, split, self.cfg.k, limit=self.cfg.score_limit)

    def dnn(self, name: str, split: Split, *, limit: bool = True) -> float:
        from training.train_baseline import evaluate_accuracy

        scored = self.limit(split) if limit else split
        return evaluate_accuracy(self.baseline(name), scored.x, scored.y)

    def tent(
        self, adapt: Split | None, score: Split, *, limit: bool = True, arch: str = "bncnn", lr: float = 1e-3
    ) -> float:
        """TENT online over the adapt half (if any), then the score half; accuracy on the score half."""
        from training.train_baseline import tent_accuracy

        adapt_x = None if adapt is None else self.limit(adapt).x
        scored = self.limit(score) if limit else score
        return tent_accuracy(self.baseline(arch), scored.x, scored.y, adapt_x=adapt_x, lr=lr)


def same_recipe(saved: dict[str, Any] | None, ft: FinetuneConfig) -> bool:
    """Whether fine-tuned weights saved with settings ``saved`` were made with ``ft``."""
    try:
        return saved is not None and FinetuneConfig(**saved) == ft
    except TypeError:  # settings of an option this version does not know
        return False


def source_baselines(ev: Evaluator, prefix: str, score: Split) -> None:
    """The two BN-CNNs that TENT adapts, without adaptation (running BatchNorm statistics), so
    that what TENT adds is told apart from what the architecture gives: ``{prefix}.bncnn`` (dense
    head, key ``tent`` after TENT) and ``{prefix}.bncnn_gap`` (global pooling, ``tent_gap``)."""
    for arch in ("bncnn", "bncnn_gap"):
        ev.cache.get(f"{prefix}.{arch}", partial(ev.dnn, arch, score))


def section_clean(ev: Evaluator) -> None:
    n = ev.args.clean_limit
    test = Split(ev.mnist.test.x[:n], ev.mnist.test.y[:n])
    c = ev.cache
    for name, pathway in VARIANTS.items():
        model = variant(ev.clean, pathway)
        c.get(
            f"mnist.clean.{name}",
            partial(cama_accuracy, model, test, ev.cfg.k),
            model=ev.digest,
            k=ev.cfg.k,
            n=len(test),
        )
    for name, pathway in VARIANTS.items():
        c.get(
            f"mnist.clean_score_half.{name}",
            partial(ev.cama, variant(ev.clean, pathway), ev.clean_score),
            model=ev.digest,
        )
    c.get(
        "mnist.clean.cama.k1",
        partial(cama_accuracy, variant(ev.clean, "transform"), test, 1),
        model=ev.digest,
        k=1,
    )
    c.get("mnist.clean.dnn", partial(ev.dnn, "dnn", test, limit=False), n=len(test))
    c.get("mnist.clean.tent", partial(ev.tent, None, test, limit=False), n=len(test))
    c.get("mnist.clean.tent_gap", partial(ev.tent, None, test, limit=False, arch="bncnn_gap"), n=len(test))
    for arch in ("bncnn", "bncnn_gap"):
        c.get(f"mnist.clean.{arch}", partial(ev.dnn, arch, test, limit=False), n=len(test))
    # timings carry the device in their key when it is not this machine's CPU
    suffix = "" if ev.device.type == "cpu" else f".{ev.device.type}"
    timed = variant(ev.clean, "transform")
    cama_accuracy(timed, Split(test.x[:100], test.y[:100]), ev.cfg.k)  # warm-up
    if ev.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    cama_accuracy(timed, Split(test.x[:1000], test.y[:1000]), ev.cfg.k)
    if ev.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    c.put(
        f"mnist.predict_seconds_per_1000.cama{suffix}", {"value": seconds, "k": ev.cfg.k, "model": ev.digest}
    )
    trained_on = str(ev.clean_meta.provenance.get("device", "cpu"))
    epoch_key = "mnist.train_epoch_seconds.cama" + ("" if trained_on == "cpu" else f".{trained_on}")
    c.put(epoch_key, {"value": float(ev.clean_meta.metrics["train_epoch_seconds"]), "model": ev.digest})


def section_fig1(ev: Evaluator) -> None:
    """Fig. 1: the DNN trained on clean data and on shift-augmented data, tested on both shifts."""
    for shift in SHIFTS:
        for r in ev.args.ranges:
            h = manipulated_halves(ev.mnist.test, shift, r)
            for name in ("dnn", "dnn_aug_v", "dnn_aug_h"):
                ev.cache.get(f"mnist.fig1.{shift}.{r}.{name}", partial(ev.dnn, name, h.score))


def section_fig7(ev: Evaluator) -> None:
    c = ev.cache
    for r in ev.args.ranges:
        sets = {shift: manipulated_halves(ev.mnist.test, shift, r) for shift in SHIFTS}
        for shift, h in sets.items():
            c.get(f"mnist.{shift}.{r}.dnn", partial(ev.dnn, "dnn", h.score))
            c.get(f"mnist.{shift}.{r}.tent", partial(ev.tent, h.adapt, h.score))
            c.get(f"mnist.{shift}.{r}.tent_gap", partial(ev.tent, h.adapt, h.score, arch="bncnn_gap"))
            source_baselines(ev, f"mnist.{shift}.{r}", h.score)
            for name, pathway in VARIANTS.items():
                if name not in ev.args.variants:
                    continue
                c.get(
                    f"mnist.{shift}.{r}.{name}",
                    partial(ev.cama, variant(ev.clean, pathway), h.score),
                    model=ev.digest,
                )
        for name, pathway in VARIANTS.items():
            if name not in ev.args.variants:
                continue
            for ft_shift, tag in SHIFTS.items():
                keys = [f"mnist.{s}.{r}.{name}_ft_{tag}" for s in SHIFTS] + [
                    f"mnist.clean_after_ft_{tag}.{r}.{name}"
                ]
                if all(c.fresh(k, ev.digest, ev.recipe) for k in keys):
                    continue
                model, info = ev.ft_model(f"{name}_{ft_shift}_{r}", pathway, sets[ft_shift].adapt.x)
                for s, h in sets.items():
                    c.get(
                        f"mnist.{s}.{r}.{name}_ft_{tag}",
                        partial(ev.cama, model, h.score),
                        model=ev.digest,
                        recipe=ev.recipe,
                        gate=info["gate"],
                    )
                c.get(
                    f"mnist.clean_after_ft_{tag}.{r}.{name}",
                    partial(ev.cama, model, ev.clean_score),
                    model=ev.digest,
                    recipe=ev.recipe,
                )


def section_noise(ev: Evaluator, manipulation: str = "noise", level: float = 0.3) -> None:
    c = ev.cache
    h = manipulated_halves(ev.mnist.test, manipulation, level)
    prefix = f"mnist.{manipulation}.{level:g}"
    c.get(f"{prefix}.dnn", partial(ev.dnn, "dnn", h.score))
    c.get(f"{prefix}.tent", partial(ev.tent, h.adapt, h.score))
    c.get(f"{prefix}.tent_gap", partial(ev.tent, h.adapt, h.score, arch="bncnn_gap"))
    source_baselines(ev, prefix, h.score)
    for name, pathway in VARIANTS.items():
        if name not in ev.args.variants:
            continue
        c.get(f"{prefix}.{name}", partial(ev.cama, variant(ev.clean, pathway), h.score), model=ev.digest)
        keys = [f"{prefix}.{name}_ft", f"mnist.clean_after_ft_{manipulation}_{level:g}.{name}"]
        if all(c.fresh(k, ev.digest, ev.recipe) for k in keys):
            continue
        model, info = ev.ft_model(f"{name}_{manipulation}_{level:g}", pathway, h.adapt.x)
        c.get(keys[0], partial(ev.cama, model, h.score), model=ev.digest, recipe=ev.recipe, gate=info["gate"])
        c.get(keys[1], partial(ev.cama, model, ev.clean_score), model=ev.digest, recipe=ev.recipe)
        c.put(
            f"{prefix}.{name}_gate_accepted",
            {"value": float(info["gate"]["accepted"]), "model": ev.digest, "recipe": ev.recipe},
        )


def section_tent_lr(ev: Evaluator, level: float = 0.3) -> None:
    """TENT's step size swept over ``TENT_LRS`` on both BN-CNNs at shift range ``level``.

    Picking the best of these by test accuracy uses the labels, so it is an upper bound on what
    tuning TENT could give; ``tent`` and ``tent_gap`` keep TENT's default (Adam, lr 1e-3)."""
    for shift in SHIFTS:
        h = manipulated_halves(ev.mnist.test, shift, level)
        for arch, name in (("bncnn", "tent"), ("bncnn_gap", "tent_gap")):
            for lr in TENT_LRS:
                ev.cache.get(
                    f"mnist.{shift}.{level}.{name}_lr.{lr:g}",
                    partial(ev.tent, h.adapt, h.score, arch=arch, lr=lr),
                )


def section_unseen(ev: Evaluator) -> None:
    for manipulation, level in UNSEEN:
        section_noise(ev, manipulation, level)


def section_fig8(ev: Evaluator, shift: str = "vshift", level: float = 0.3) -> None:
    """Fig. 8: accuracy after fine-tuning on 1%, 5%, 10%, 50% of the test set (same step budget)."""
    h = manipulated_halves(ev.mnist.test, shift, level)
    budget = max(1, (len(h.adapt) - ev.cfg.gate_holdout) // ev.cfg.ft.batch_size) * ev.cfg.ft.epochs
    for fraction in (0.01, 0.05, 0.1):
        n = int(fraction * len(ev.mnist.test))
        key = f"mnist.fig8.{shift}.{level:g}.frac.{fraction:g}.cama"
        if ev.cache.fresh(key, ev.digest, ev.recipe):
            continue
        adapt_x = np.concatenate([h.adapt.x[: ev.cfg.gate_holdout], h.adapt.x[ev.cfg.gate_holdout :][:n]])
        epochs = int(np.ceil(budget * ev.cfg.ft.batch_size / n))
        cfg = ev.cfg.ft.__class__(**{**asdict(ev.cfg.ft), "epochs": epochs, "max_steps": budget})
        saved, ev.cfg = ev.cfg, EvalConfig(**{**ev.cfg.__dict__, "ft": cfg})
        try:
            model, info = ev.ft_model(f"fig8_{shift}_{level:g}_{fraction:g}", "transform", adapt_x)
        finally:
            ev.cfg = saved
        ev.cache.get(
            key,
            partial(ev.cama, model, h.score),
            model=ev.digest,
            recipe=ev.recipe,
            gate=info["gate"],
            n_adapt=n,
        )
    full = f"mnist.{shift}.{level}.cama_ft_{SHIFTS[shift]}"
    if ev.cache.fresh(full, ev.digest, ev.recipe):
        ev.cache.put(f"mnist.fig8.{shift}.{level:g}.frac.0.5.cama", dict(ev.cache.data[full]))


def section_fig10(ev: Evaluator) -> None:
    """Fig. 10: CAMA trained with shift-augmented data (eq. 5, range 0.5), tested on both shifts,
    before and after fine-tuning on the test shift (cf. the DNN of fig. 1)."""
    for tag, path in (("v", ev.args.cama_aug_v), ("h", ev.args.cama_aug_h)):
        if not Path(path).exists():
            print(f"fig10: skipped, no augmented CAMA checkpoint {path}", flush=True)
            continue
        aug, _ = load_checkpoint(path)
        if not isinstance(aug, ImageCama):
            raise SystemExit(f"{path} is not an image CAMA checkpoint")
        aug = aug.to(ev.device)
        pathway = aug.config.m_pathway
        name = f"cama_aug_{tag}"
        digest = sha256_file(path)[:12]
        ev.cache.get(f"mnist.fig10.clean.{name}", partial(ev.cama, aug, ev.clean_score), model=digest)
        for r in ev.args.ranges:
            for shift in SHIFTS:
                h = manipulated_halves(ev.mnist.test, shift, r)
                prefix = f"mnist.fig10.{shift}.{r}"
                ev.cache.get(f"{prefix}.{name}", partial(ev.cama, aug, h.score), model=digest)
                if r == 0.0 or ev.cache.fresh(f"{prefix}.{name}_ft", digest, ev.recipe):
                    continue
                model, info = ev.ft_model(f"{name}_{digest}_{shift}_{r}", pathway, h.adapt.x, base=aug)
                ev.cache.get(
                    f"{prefix}.{name}_ft",
                    partial(ev.cama, model, h.score),
                    model=digest,
                    recipe=ev.recipe,
                    gate=info["gate"],
                )


def section_ablation(ev: Evaluator) -> None:
    """q(m|x) initialisation: the transform pathway fine-tuned from a zero q(m|x) mean (the same m
    for every x) instead of the random projection ``reinit_m_inference`` gives it."""
    for manipulation, level, tag in (("vshift", 0.3, "ft_v"), ("noise", 0.3, "ft")):
        h = manipulated_halves(ev.mnist.test, manipulation, level)
        key = f"mnist.ablation.q_m_zero.{manipulation}.{level:g}.cama_{tag}"
        if ev.cache.fresh(key, ev.digest, ev.recipe):
            continue
        name = f"ablation_q_m_zero_{manipulation}_{level:g}"
        model, info = ev.ft_model(name, "transform", h.adapt.x, zero_q_m=True)
        ev.cache.get(
            key, partial(ev.cama, model, h.score), model=ev.digest, recipe=ev.recipe, gate=info["gate"]
        )


@torch.no_grad()
def section_fig9(ev: Evaluator, shift: str = "vshift", level: float = 0.3, n: int = 10) -> None:
    """Fig. 9: shifted digits, their reconstructions, and do(m=0) reconstructions (same y, z)."""
    from cama.image_model import ImageContext
    from cama.protocol import given_labels
    from training.plots import image_grid

    h = manipulated_halves(ev.mnist.test, shift, level)
    model, _ = ev.ft_model(f"cama_{shift}_{level}", "transform", h.adapt.x)
    x = torch.from_numpy(h.score.x[:n]).to(ev.device)
    labels = torch.from_numpy(h.score.y[:n]).to(ev.device)
    mu_m, _ = model.infer_m(x)
    ctx = model.prepare(x, mu_m.unsqueeze(0))
    y = given_labels(labels, model.num_classes)
    mu_z, _ = model.infer_z(ctx, y)
    with_m = model.mean_image(ctx, y, mu_z)[0, 0, :, 0].float().cpu().numpy()
    do_zero = ImageContext(m=torch.zeros_like(ctx.m), features=ctx.features, params=None)
    canonical = model.mean_image(do_zero, y, mu_z)[0, 0, :, 0].float().cpu().numpy()
    image_grid(
        [h.score.x[:n, 0], with_m, canonical],
        [f"{shift} {level} test digits", "reconstruction p(x|y,z,m)", "do(m=0): p(x|y,z,m=0)"],
        ev.out / "fig9.png",
    )


OTHER_RECIPE_MARK = " †"


def summary_tables(data: dict[str, float], other_recipe: Collection[str] = ()) -> list[str]:
    """Fig. 7 and the other manipulations as tables, both m pathways side by side; a figure in
    ``other_recipe`` (fine-tuned with another recipe than the run's) is marked with a dagger."""

    def _row(label: str, keys: list[str], data: dict[str, float]) -> str | None:
        if not any(k in data for k in keys):
            return None
        mark = {k: OTHER_RECIPE_MARK if k in other_recipe else "" for k in keys}
        cells = [f"{data[k]:.4f}{mark[k]}" if k in data else "" for k in keys]
        return "| " + " | ".join([label, *cells]) + " |"

    lines: list[str] = []
    for name, title in (
        ("cama", "transform m pathway (`cama`)"),
        ("cama_paper", "appendix-C pathway (`cama_paper`)"),
    ):
        lines += [
            f"## Fig. 7, {title}",
            "",
            "| test set | DNN | BN-CNN dense head | + TENT | BN-CNN global pool | + TENT | CAMA "
            "| + FT vertical | + FT horizontal |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for shift in SHIFTS:
            for r in RANGES:
                cols = ["dnn", "bncnn", "tent", "bncnn_gap", "tent_gap", name, f"{name}_ft_v", f"{name}_ft_h"]
                row = _row(f"{shift} {r}", [f"mnist.{shift}.{r}.{c}" for c in cols], data)
                if row:
                    lines.append(row)
        lines.append("")
    lines += [
        "## Other manipulations (fine-tuned on the unlabelled adapt half, scored on the other half)",
        "",
        "| test set | DNN | BN-CNN dense head | + TENT | BN-CNN global pool | + TENT | CAMA | CAMA + FT "
        "| appendix-C | appendix-C + FT |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for manipulation, level in (("noise", 0.3), *UNSEEN):
        prefix = f"mnist.{manipulation}.{level:g}"
        cols = [
            "dnn",
            "bncnn",
            "tent",
            "bncnn_gap",
            "tent_gap",
            "cama",
            "cama_ft",
            "cama_paper",
            "cama_paper_ft",
        ]
        row = _row(f"{manipulation} {level:g}", [f"{prefix}.{c}" for c in cols], data)
        if row:
            lines.append(row)
    lr_rows = [
        _row(
            f"{shift} 0.3, {label}",
            [f"mnist.{shift}.0.3.{name}_lr.{lr:g}" for lr in TENT_LRS] + [f"mnist.{shift}.0.3.cama_ft_{tag}"],
            data,
        )
        for shift, tag in SHIFTS.items()
        for name, label in (("tent", "dense head"), ("tent_gap", "global pool"))
    ]
    if any(lr_rows):
        lines += [
            "",
            "## TENT's learning rate (`--sections tent_lr`; the best of these is chosen with the labels)",
            "",
            "| test set, BN-CNN | " + " | ".join(f"lr {lr:g}" for lr in TENT_LRS) + " | CAMA + FT |",
            "| --- |" + " ---: |" * (len(TENT_LRS) + 1),
            *[row for row in lr_rows if row],
        ]
    lines += [
        "",
        "## Fig. 10, CAMA trained with shift-augmented data (eq. 5, range 0.5)",
        "",
        "| test set | aug. vertical | + FT | aug. horizontal | + FT |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for shift in SHIFTS:
        for r in RANGES:
            cols = ["cama_aug_v", "cama_aug_v_ft", "cama_aug_h", "cama_aug_h_ft"]
            row = _row(f"{shift} {r}", [f"mnist.fig10.{shift}.{r}.{c}" for c in cols], data)
            if row:
                lines.append(row)
    return lines


def write_outputs(ev: Evaluator) -> None:
    """Flat metrics, headline aliases, a markdown table and plots, from the cache."""
    data = {k: float(v["value"]) for k, v in ev.cache.data.items()}
    metrics = dict(data)
    for tag in SHIFTS.values():
        for name in VARIANTS:
            per_range = [
                v
                for k, v in data.items()
                if k.startswith(f"mnist.clean_after_ft_{tag}.") and k.endswith(f".{name}")
            ]
            if per_range:
                metrics[f"mnist.clean_after_ft_{tag}.{name}"] = min(per_range)
    for name in VARIANTS:
        for key_from, key_to in (
            (f"mnist.clean_after_ft_noise_0.3.{name}", f"mnist.clean_after_ft_noise.{name}"),
        ):
            if key_from in data:
                metrics[key_to] = data[key_from]
    update_metrics(metrics, ev.out / "metrics.json")
    from training.plots import plot_mnist

    plot_mnist(data, ev.out)
    intro = (
        "Accuracy (fraction) on the scoring half of the manipulated MNIST test set, K=10 importance "
        "samples per class for CAMA; fine-tuning (FT) uses the other, unlabelled half. The protocol "
        "and the device of each figure are below the tables (`## Every figure`); the plots are beside "
        "this file."
    )
    other = sorted(k for k in ev.cache.data if ev.cache.recipe_of(k) not in (None, ev.recipe))
    if other:
        intro += (
            f" {OTHER_RECIPE_MARK.strip()} marks a figure fine-tuned with another recipe than this run's"
            f" (`{ev.recipe}`): {len(other)} of the cached figures; their recipe is in the `recipe`"
            " column of `## Every figure`."
        )
    lines = ["# MNIST results", "", intro, "", *summary_tables(data, set(other)), ""]
    lines += [
        "## Every figure",
        "",
        "Every figure measured so far, from the cache `mnist_eval.json` beside this file (an entry is",
        "measured once and kept until `--force`; `device` says where, `n` how many images were scored",
        "where fewer than the whole 5000-image half, `model` the first 12 hex digits of the SHA-256 of",
        "the CAMA checkpoint it scored, `recipe` the fine-tuning settings that differ from",
        "`FinetuneConfig`'s defaults, empty for a figure without fine-tuning; figures cached before",
        f"recipes were recorded were fine-tuned with `{LEGACY_RECIPE}`). Last written by",
        f"`{' '.join(['python -m training.evaluate_mnist', *sys.argv[1:]])}` "
        f"(K={ev.cfg.k}, fine-tuning {asdict(ev.cfg.ft)}).",
        "",
        "| key | value | seconds | device | n | model | recipe |",
        "| --- | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for key in sorted(ev.cache.data):
        entry = ev.cache.data[key]
        lines.append(
            f"| `{key}` | {entry['value']:.4f} | {entry.get('seconds', '')} | {entry.get('device', 'cpu')} "
            f"| {entry.get('n_score', '')} | {entry.get('model', '')} | {ev.cache.recipe_of(key) or ''} |"
        )
    (ev.out / "mnist.md").write_text("\n".join(lines) + "\n")


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The options that change the fine-tuning recipe from :class:`EvalConfig`'s (``--ft-*``)."""
    parser.add_argument("--ft-steps", type=int, default=None, help="cap fine-tuning steps (smoke runs)")
    parser.add_argument(
        "--ft-schedule", choices=["constant", "cosine"], default=None, help="fine-tuning step size schedule"
    )
    parser.add_argument(
        "--ft-decay",
        type=float,
        default=None,
        help="with --ft-schedule cosine: decay over this last fraction of the run (decay_fraction)",
    )
    parser.add_argument(
        "--ft-average",
        choices=["none", "tail"],
        default=None,
        help="tail: fine-tuning returns the mean of its last half's iterates (FinetuneConfig.average)",
    )


def recipe_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """``EvalConfig.ft`` with the ``--ft-*`` options of :func:`add_recipe_args` applied."""
    ft = EvalConfig().ft
    changes = {
        "max_steps": args.ft_steps,
        "lr_schedule": args.ft_schedule,
        "decay_fraction": args.ft_decay,
        "average": args.ft_average,
    }
    return replace(ft, **{k: v for k, v in changes.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--checkpoint", default="models/mnist_cama_clean.pt")
    parser.add_argument("--dnn", default="models/mnist_dnn.pt")
    parser.add_argument("--dnn-aug-v", dest="dnn_aug_v", default="models/mnist_dnn_aug_vshift.pt")
    parser.add_argument("--dnn-aug-h", dest="dnn_aug_h", default="models/mnist_dnn_aug_hshift.pt")
    parser.add_argument(
        "--bncnn", default="models/mnist_bncnn_flat.pt", help="TENT: BN-CNN with a dense head"
    )
    parser.add_argument(
        "--bncnn-gap", dest="bncnn_gap", default="models/mnist_bncnn.pt", help="TENT: BN-CNN, global pooling"
    )
    parser.add_argument("--cama-aug-v", dest="cama_aug_v", default="models/mnist_cama_aug_vshift.pt")
    parser.add_argument("--cama-aug-h", dest="cama_aug_h", default="models/mnist_cama_aug_hshift.pt")
    parser.add_argument(
        "--sections",
        nargs="*",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="what to measure (none: only rewrite the tables, plots and metrics from the cache)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="CACHE",
        help="first take the figures of other runs' mnist_eval.json (parallel processes, another machine)",
    )
    parser.add_argument("--ranges", nargs="+", type=float, default=list(RANGES))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--k", type=int, default=EvalConfig.k)
    parser.add_argument("--score-limit", type=int, default=None, help="score on the first N of each half")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where metrics, tables and plots go")
    parser.add_argument("--ft-cache", default="models/scratch", help="where fine-tuned weights are kept")
    add_recipe_args(parser)
    parser.add_argument(
        "--clean-limit", type=int, default=None, help="clean accuracy on the first N test images"
    )
    parser.add_argument("--canary", type=int, default=1000, help="labelled clean images for the gate")
    parser.add_argument("--gate-holdout", type=int, default=500, help="adapt images kept for the gate")
    parser.add_argument("--force", action="store_true", help="ignore the cache and cached fine-tuned models")
    parser.add_argument(
        "--again-ft",
        dest="again_ft",
        action="store_true",
        help="measure the fine-tuned figures of this checkpoint again and keep the others (fine-tuned"
        " weights in --ft-cache are still reused: give a fresh one)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ft = recipe_from_args(args)
    cfg = EvalConfig(
        k=args.k, score_limit=args.score_limit, ft=ft, gate_holdout=args.gate_holdout, canary=args.canary
    )
    ev = Evaluator(args, cfg)
    sections: dict[str, Callable[[Evaluator], None]] = {
        "clean": section_clean,
        "fig1": section_fig1,
        "fig7": section_fig7,
        "noise": section_noise,
        "unseen": section_unseen,
        "fig8": section_fig8,
        "fig9": section_fig9,
        "fig10": section_fig10,
        "ablation": section_ablation,
        "tent_lr": section_tent_lr,
    }
    for name in args.sections:
        if name in sections:
            sections[name](ev)
    write_outputs(ev)


if __name__ == "__main__":
    main()
