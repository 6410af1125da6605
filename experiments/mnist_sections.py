"""The sections of the MNIST evaluation (figs. 1, 7, 8, 9, 10, noise, unseen manipulations,
the ablation and TENT's step size): what each measures, on which model, into which cache key.

The protocol (appendix C): fine-tuning uses the unlabelled "adapt" half of the manipulated test
set, minus ``gate_holdout`` images kept for the promotion gate's held-out ELBO(x), through
``cama.adapt.adapt_and_judge``; accuracy is reported on the other half.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cama.adapt import FinetuneConfig, GateConfig, Labelled, adapt_and_judge
from cama.checkpoint import load_checkpoint, sha256_file
from cama.image_model import ImageCama
from cama.runtime import atomic_write, resolve_device
from experiments.eval_cache import Cache, MissingModelError, recipe_id
from experiments.experiment import (
    halves,
    manipulated_halves,
    replay_set,
    start_model,
    table_accuracy,
    variant,
)
from training.data import Mnist, Split, load_mnist, validation_split

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
    ft: FinetuneConfig = field(default_factory=FinetuneConfig)  # the image recipe


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
        self.replay = tuple(t.to(self.device) for t in replay_set(self.mnist, cfg.replay))
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
        model = start_model(base, pathway, reinit_q_m=base is self.clean, zero_q_m=zero_q_m)
        outcome = adapt_and_judge(
            model,
            torch.from_numpy(train_x).to(self.device),
            heldout,
            self.cfg.ft,
            GateConfig(k=self.cfg.k),
            replay=Labelled(*self.replay),
            canary=Labelled(*self.canary),
            keep_refused=True,  # the paper's figures score the fine-tuned model; the verdict is kept
        )
        decision, seconds = outcome.decision, outcome.finetune_seconds
        info = {"finetune_seconds": seconds, "gate": decision.as_dict(), "ft": self.cfg.ft.as_dict()}
        print(
            f"  {name}: fine-tuned in {seconds:.0f}s, gate {'accepts' if decision.accepted else 'REJECTS'} "
            f"{list(decision.reasons)}",
            flush=True,
        )
        atomic_write(path, lambda fh: torch.save({"state_dict": model.state_dict(), "info": info}, fh))
        return model.eval(), info

    # --- scoring ------------------------------------------------------------------------------
    def limit(self, split: Split) -> Split:
        """The first ``--score-limit`` items of a split (every method scores the same items)."""
        n = self.cfg.score_limit
        return split if n is None else Split(split.x[:n], split.y[:n])

    def cama(self, model: ImageCama, split: Split) -> float:
        return table_accuracy(model, split, self.cfg.k, limit=self.cfg.score_limit)

    def dnn(self, name: str, split: Split, *, limit: bool = True) -> float:
        from training.baselines import evaluate_accuracy

        scored = self.limit(split) if limit else split
        return evaluate_accuracy(self.baseline(name), scored.x, scored.y)

    def tent(
        self, adapt: Split | None, score: Split, *, limit: bool = True, arch: str = "bncnn", lr: float = 1e-3
    ) -> float:
        """TENT online over the adapt half (if any), then the score half; accuracy on the score half."""
        from training.tent import tent_accuracy

        adapt_x = None if adapt is None else self.limit(adapt).x
        scored = self.limit(score) if limit else score
        return tent_accuracy(self.baseline(arch), scored.x, scored.y, adapt_x=adapt_x, lr=lr)


def source_baselines(ev: Evaluator, prefix: str, score: Split) -> None:
    """The two BN-CNNs that TENT adapts, without adaptation (running BatchNorm statistics), so
    that what TENT adds is told apart from what the architecture gives: ``{prefix}.bncnn`` (dense
    head, key ``tent`` after TENT) and ``{prefix}.bncnn_gap`` (global pooling, ``tent_gap``)."""
    for arch in ("bncnn", "bncnn_gap"):
        ev.cache.get(f"{prefix}.{arch}", partial(ev.dnn, arch, score))


def same_recipe(saved: dict[str, Any] | None, ft: FinetuneConfig) -> bool:
    """Whether fine-tuned weights saved with settings ``saved`` were made with ``ft``."""
    try:
        return saved is not None and FinetuneConfig.from_dict(saved) == ft
    except ValueError:  # settings of an option this version does not know
        return False


def section_clean(ev: Evaluator) -> None:
    n = ev.args.clean_limit
    test = Split(ev.mnist.test.x[:n], ev.mnist.test.y[:n])
    c = ev.cache
    for name, pathway in VARIANTS.items():
        model = variant(ev.clean, pathway)
        c.get(
            f"mnist.clean.{name}",
            partial(table_accuracy, model, test, ev.cfg.k),
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
        partial(table_accuracy, variant(ev.clean, "transform"), test, 1),
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
    table_accuracy(timed, Split(test.x[:100], test.y[:100]), ev.cfg.k)  # warm-up
    if ev.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    table_accuracy(timed, Split(test.x[:1000], test.y[:1000]), ev.cfg.k)
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
        cfg = replace(ev.cfg.ft, epochs=epochs, max_steps=budget)
        saved, ev.cfg = ev.cfg, replace(ev.cfg, ft=cfg)
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
    from experiments.plots import image_grid

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
