"""Adversarial robustness (paper section 4.1, figs 11-13): FGSM and PGD against the DNN (the CNN on
CIFAR-binary) and CAMA, before and after CAMA's fine-tuning on the attacked set.

    python -m experiments.evaluate_adversarial --dataset mnist          # the two together: under
    python -m experiments.evaluate_adversarial --dataset measurement    # 3 hours on 2 CPU cores
    python -m experiments.evaluate_adversarial --dataset cifar          # CIFAR-binary
    python -m experiments.evaluate_adversarial --sections               # only rewrite table, plots, metrics

L-inf attacks (``experiments.attacks``) with the margin loss on the logits; CAMA's logits are eq. 6's
per-class log-weights log p(x, y_c) with K = 10. PGD: a random start, ``PGD_STEPS`` steps of
2.5 eps / steps, run anew at each eps. FGSM at eps keeps, per input, the most harmful (by the
attack's loss) of FGSM's examples at the figure's budgets up to eps, all of which lie in the eps
ball: a single step of eps can jump past the decision boundary that a smaller step crosses.
The attacker differentiates in bf16 autocast where the CPU has it; every accuracy is computed in
float32. CAMA is attacked in three settings (methods):

- ``cama``, the paper's: each gradient through one fresh draw of the importance-sampling noise,
  scored as ``POST /predict`` answers (fresh noise, the first-sample screen);
- ``cama_fixed``: the noise held fixed, in the attack and in the scoring (a deterministic white box);
- ``cama_eot``: each gradient the mean over ``EOT_DRAWS`` fresh draws (expectation over
  transformation, Athalye et al. 2018), scored as served;

and ``cama_ft`` / ``cama_ft_eot``: CAMA fine-tuned on the whole attacked set (unlabelled, as the
paper does for attacks) of the ``cama`` / ``cama_eot`` attack and scored on it. For images the
fine-tuning is ``POST /adapt``'s own code path (``cama.adapt.adapt_batch``: the checkpoint's
recipe, the gate, replay and canary; a refused job scores as the unadapted model); for the
measurement data it is eq. 8 with the service's measurement recipe on the affine m pathway, as in
``experiments.evaluate_measurement``. ``<dataset>.clean_after_ft.cama`` is the lowest clean accuracy
after any of those fine-tunings.

Data: MNIST or CIFAR-binary, a seeded draw of ``--n`` test images, attacked by ``--batch``;
clean accuracy after fine-tuning on ``--clean-n`` other test images. The models: the served CAMA
checkpoint, its serving data (replay and canary) and the baseline of ``IMAGE_DATA``. Measurement
data: the appendix-C generator, per seed a CAMA and a DNN trained as
``experiments.evaluate_measurement`` trains them, the 500 test rows attacked on the children X and
the co-parents C only (standardised units), means over seeds.

Sanity checks of the evaluation (Carlini et al. 2019), MNIST: accuracy non-increasing in eps
(within ``MONOTONE_SLACK`` for the stochastic settings); PGD at eps 0.5 near chance for the DNN and
for CAMA; 10x the PGD steps raising no model's accuracy by more than 1 point (first ``--sanity-n``
images); a transfer attack from the DNN weaker than the white-box EOT attack; an adaptive attack
through the adaptation (``cama_ft_adaptive``: PGD against the fine-tuned model, then the fine-tuning
run again on that batch, scored after it); and the PGD used here within 1 point of foolbox's
``LinfPGD`` on the DNN with the same loss, steps and step size. CIFAR-binary: the first and the
transfer attack.

Keys ``adv.<dataset>.<attack>.<eps>.<method>``; figures are cached in
``docs/results/adversarial_<dataset>_eval.json`` (``experiments.eval_cache``) and adversarial examples
under ``--work-dir``, so an interrupted run resumes; tables go to ``docs/results/adversarial.md``,
plots to ``adversarial_mnist.png`` (fig. 11), ``adversarial_cifar.png`` (fig. 12) and
``adversarial_measurement.png`` (fig. 13).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from cama.adapt import MEASUREMENT_RECIPE, FinetuneConfig, GateConfig
from cama.checkpoint import load_checkpoint, sha256_file
from cama.image_model import ImageCama
from cama.objectives import Noise, bayes_log_weights, sample_noise
from cama.protocol import CamaModel
from cama.runtime import atomic_write
from experiments.attacks import Attack, LogitsFn, batched_perturb, strongest
from experiments.eval_cache import Cache, recipe_id
from experiments.experiment import adapt_as_served
from store.data import ServingData
from training.accuracy import served_accuracy
from training.baselines import load_baseline
from training.data import add_data_dir_argument, load_dataset
from training.metrics import update_metrics

RESULTS = Path("docs/results")
ATTACKS = ("fgsm", "pgd")
METHODS = ("dnn", "cama", "cama_fixed", "cama_eot", "cama_ft", "cama_ft_eot")
EPS = {
    "mnist": (0.05, 0.1, 0.2, 0.3),
    "cifar": (0.01, 0.02, 0.05, 0.1, 0.2),
    "measurement": (0.1, 0.2, 0.5, 1.0),
}
COSTLY_EPS = {"mnist": (0.1, 0.3), "cifar": (0.05,), "measurement": (0.5, 1.0)}  # EOT and fine-tuning
PGD_STEPS = {"mnist": 10, "cifar": 10, "measurement": 20}
BASELINE = {"mnist": "dnn", "cifar": "cnn", "measurement": "dnn"}  # the discriminative model's key
STEPS_EPS = {"mnist": 0.1, "cifar": 0.05}  # the eps of the 10x-steps check


@dataclass(frozen=True)
class ImageData:
    """An image data set of the evaluation: its loader's name and the models' default files."""

    dataset: str  # training.data.load_dataset's name
    checkpoint: str
    baseline: str
    serving_data: str


IMAGE_DATA = {
    "mnist": ImageData(
        "mnist", "models/mnist_cama.pt", "models/mnist_dnn.pt", "models/mnist_serving_data.npz"
    ),
    "cifar": ImageData(
        "cifar_binary",
        "models/cifar_binary_cama.pt",
        "models/cifar_cnn.pt",
        "models/cifar_binary_serving_data.npz",
    ),
}
CHANCE_EPS = 0.5  # MNIST: every model near chance (<= CHANCE_LEVEL) under PGD at this eps
CHANCE_LEVEL = 0.2
EOT_DRAWS = 10
K = 10
MONOTONE_SLACK = 0.02  # a stochastic score may rise this much between neighbouring eps
ATTACK_SEED = 1_000  # draw d of an attack uses the noise of seed ATTACK_SEED + d
FIXED_SEED = 7  # the fixed-noise setting's noise
EVAL_SEED = 0
MEASUREMENT_SEEDS = (0, 1, 2)


def eps_key(eps: float) -> str:
    """``0.05``, ``0.1``, ``1``: eps as written in metric keys."""
    return f"{eps:g}"


def autocast(enabled: bool) -> Any:
    """bf16 autocast on the CPU for the attacker's gradients (float32 when ``enabled`` is False)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


# --- classifiers as the attacker sees them --------------------------------------------------------


@dataclass
class Classifier:
    """What an attack differentiates (``logits``) and how its result is scored (``accuracy``)."""

    logits: LogitsFn
    accuracy: Callable[[torch.Tensor, torch.Tensor], float]  # (inputs, labels) -> accuracy


def cama_logits(
    model: CamaModel,
    split: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
    *,
    fixed: bool,
    bf16: bool,
) -> LogitsFn:
    """Eq. 6's log-weights ``(B, C)`` of ``split(v) = (x, cond)``: draw ``d`` uses the noise of seed
    ``ATTACK_SEED + d``, or always ``FIXED_SEED``'s when ``fixed``."""

    def f(v: torch.Tensor, draw: int) -> torch.Tensor:
        gen = torch.Generator(device=v.device).manual_seed(FIXED_SEED if fixed else ATTACK_SEED + draw)
        noise = sample_noise(model, v.shape[0], K, generator=gen, device=v.device)
        x, cond = split(v)
        with autocast(bf16):
            return bayes_log_weights(model, x, cond, noise=noise).float()

    return f


@torch.no_grad()
def fixed_noise_accuracy(
    model: CamaModel, split: Callable[[torch.Tensor], tuple[torch.Tensor, Any]], batch: int
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Accuracy of eq. 6 with the fixed-noise setting's noise (all K samples, no screen), in chunks of
    ``batch`` as the attack was run, so every input is scored with the noise it was attacked with."""

    def accuracy(v: torch.Tensor, y: torch.Tensor) -> float:
        right = 0
        for start in range(0, v.shape[0], batch):
            sub = v[start : start + batch]
            gen = torch.Generator(device=v.device).manual_seed(FIXED_SEED)
            noise: Noise = sample_noise(model, sub.shape[0], K, generator=gen, device=v.device)
            x, cond = split(sub)
            labels = bayes_log_weights(model, x, cond, noise=noise).argmax(1)
            right += int((labels == y[start : start + batch]).sum())
        return right / v.shape[0]

    return accuracy


# --- one run ------------------------------------------------------------------------------------------


@dataclass
class Run:
    """The cache, the work directory and the settings of one dataset's evaluation."""

    dataset: str
    cache: Cache
    work_dir: Path
    model_id: str  # the CAMA checkpoint's digest, or the training seed of the measurement models
    recipe: str  # the fine-tuning recipe (its ``recipe_id``)
    bf16: bool
    batch: int

    def key(self, *parts: object) -> str:
        return ".".join(["adv", self.dataset, *(str(p) for p in parts)])

    def examples(self, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Adversarial examples ``name``, computed once per model and kept under the work directory."""
        path = self.work_dir / self.dataset / f"{self.model_id}.{name}.pt"
        if path.exists():
            loaded: torch.Tensor = torch.load(path)
            return loaded
        out = compute()
        atomic_write(path, lambda fh: torch.save(out, fh))
        return out

    def perturbation(
        self,
        logits: LogitsFn,
        v: torch.Tensor,
        y: torch.Tensor,
        attack: Attack,
        bounds: tuple[float, float] | None = (0.0, 1.0),
    ) -> Callable[[], torch.Tensor]:
        """The computation of ``attack``'s examples against ``logits`` (for :meth:`examples`)."""
        return partial(
            batched_perturb, logits, v, y, attack, batch=self.batch, bounds=bounds, seed=ATTACK_SEED
        )

    def scored(
        self,
        name: str,
        compute: Callable[[], torch.Tensor],
        accuracy: Callable[[torch.Tensor, torch.Tensor], float],
        y: torch.Tensor,
    ) -> float:
        """``accuracy`` on the examples ``name`` (:meth:`examples`): a figure's computation, which
        makes the examples only where the figure is not cached."""
        return accuracy(self.examples(name, compute), y)


@dataclass
class Tuned:
    """CAMA fine-tuned on an attacked set: the model the fine-tuning produced, the one served after
    the promotion gate (the unadapted model where the gate refused), and their clean accuracies."""

    adapted: Classifier
    served: Classifier
    clean_adapted: Callable[[], float]
    clean_served: Callable[[], float]
    accepted: bool


def attack_of(name: str, eps: float, dataset: str, *, eot: int = 1, steps: int | None = None) -> Attack:
    """FGSM, or PGD with the dataset's steps (or ``steps``), with ``eot`` gradient draws per step."""
    if name == "fgsm":
        return Attack.fgsm(eps, eot=eot)
    return Attack(eps=eps, steps=steps or PGD_STEPS[dataset], eot=eot)


def settings_at(dataset: str, eps: float) -> dict[str, tuple[str, int]]:
    """The attacked methods at ``eps``: method -> (the target it differentiates, gradient draws)."""
    baseline = BASELINE[dataset]
    settings = {baseline: (baseline, 1), "cama": ("cama", 1), "cama_fixed": ("cama_fixed", 1)}
    if eps in COSTLY_EPS[dataset]:
        settings["cama_eot"] = ("cama", EOT_DRAWS)
    return settings


@dataclass
class Attacked:
    """The adversarial examples of a figure's attacks, each computed on first use.

    FGSM at eps keeps, per input, the most harmful of its examples at every budget of the figure up
    to eps (:func:`experiments.attacks.strongest`), since its single step overshoots at large budgets;
    PGD at each eps is its own run.
    """

    run: Run
    targets: dict[str, Classifier]
    v: torch.Tensor
    y: torch.Tensor
    bounds: tuple[float, float] | None
    prefix: str = ""
    memo: dict[tuple[str, float, str], torch.Tensor] = dataclasses.field(default_factory=dict)

    def __call__(self, attack_name: str, eps: float, method: str) -> torch.Tensor:
        """The examples of ``method`` under ``attack_name`` at ``eps``."""
        key = (attack_name, eps, method)
        if key not in self.memo:
            target, eot = settings_at(self.run.dataset, eps)[method]
            classifier = self.targets[target]
            attack = attack_of(attack_name, eps, self.run.dataset, eot=eot)
            name = f"{self.prefix}{attack_name}.{eps_key(eps)}.{method}"
            examples = self.run.examples(
                name, self.run.perturbation(classifier.logits, self.v, self.y, attack, self.bounds)
            )
            smaller = [
                e for e in EPS[self.run.dataset] if e < eps and method in settings_at(self.run.dataset, e)
            ]
            if attack_name == "fgsm" and smaller:
                candidates = [self(attack_name, smaller[-1], method), examples]
                examples = self.run.examples(
                    f"{name}.strongest",
                    partial(
                        strongest,
                        classifier.logits,
                        candidates,
                        self.y,
                        draws=range(eot),
                        batch=self.run.batch,
                    ),
                )
            self.memo[key] = examples
        return self.memo[key]

    def accuracy(self, attack_name: str, eps: float, method: str) -> float:
        """The accuracy of ``method``'s target on its examples."""
        target, _ = settings_at(self.run.dataset, eps)[method]
        return self.targets[target].accuracy(self(attack_name, eps, method), self.y)


def white_box(
    run: Run,
    targets: dict[str, Classifier],
    v: torch.Tensor,
    y: torch.Tensor,
    *,
    bounds: tuple[float, float] | None,
    finetune: Callable[[torch.Tensor], Tuned],
    prefix: str = "",
) -> None:
    """Every attack, eps and method of the figure (:class:`Attacked`); ``finetune(v_adv)``: CAMA
    fine-tuned on ``v_adv``."""
    attacked = Attacked(run, targets, v, y, bounds, prefix)
    for attack_name in ATTACKS:
        for eps in EPS[run.dataset]:
            for method in settings_at(run.dataset, eps):
                run.cache.get(
                    run.key(f"{prefix}{attack_name}.{eps_key(eps)}.{method}"),
                    partial(attacked.accuracy, attack_name, eps, method),
                    model=run.model_id,
                )
            if eps not in COSTLY_EPS[run.dataset]:
                continue
            for method, source in (("cama_ft", "cama"), ("cama_ft_eot", "cama_eot")):
                name = f"{prefix}{attack_name}.{eps_key(eps)}.{method}"
                if run.cache.fresh(run.key(name), run.model_id, run.recipe):
                    continue
                examples = attacked(attack_name, eps, source)
                tuned = finetune(examples)
                clean = f"{prefix}clean_after_ft.{attack_name}.{eps_key(eps)}.{method}"
                figures: list[tuple[str, Callable[[], float]]] = []
                if tuned.served is not tuned.adapted:  # a gate judged the fine-tuning
                    figures += [
                        (f"{name}_adapted", partial(tuned.adapted.accuracy, examples, y)),
                        (f"{clean}_adapted", tuned.clean_adapted),
                        (f"{name}_gate", partial(float, tuned.accepted)),
                    ]
                figures += [
                    (clean, tuned.clean_served),
                    (name, partial(tuned.served.accuracy, examples, y)),  # last: marks the set done
                ]
                for key, compute in figures:
                    run.cache.get(run.key(key), compute, model=run.model_id, recipe=run.recipe)


# --- MNIST -----------------------------------------------------------------------------------------------


def image_split(v: torch.Tensor) -> tuple[torch.Tensor, Any]:
    return v, None


def evaluate_images(args: argparse.Namespace, dataset: str) -> None:
    """Fig. 11 (MNIST) or fig. 12 (CIFAR-binary) on a seeded draw of ``args.n`` test images, and the
    sanity checks (all of them on MNIST; monotonicity and transfer on CIFAR-binary)."""
    files = IMAGE_DATA[dataset]
    checkpoint = Path(args.checkpoint or files.checkpoint)
    cama, meta = load_checkpoint(checkpoint)
    assert isinstance(cama, ImageCama)
    cama.eval().requires_grad_(False)
    dnn = load_baseline(args.dnn or files.baseline)[0].eval().requires_grad_(False)
    data = load_dataset(files.dataset, args.data_dir)
    order = np.random.default_rng(args.seed).permutation(len(data.test))
    x = torch.from_numpy(data.test.x[order[: args.n]])
    y = torch.from_numpy(data.test.y[order[: args.n]]).long()
    clean_x = torch.from_numpy(data.test.x[order[args.n : args.n + args.clean_n]])
    clean_y = torch.from_numpy(data.test.y[order[args.n : args.n + args.clean_n]]).long()
    recipe = FinetuneConfig.from_dict(
        args.recipe, base=FinetuneConfig.from_dict(meta.provenance.get("adapt_recipe") or {})
    )
    gate, serving = GateConfig(), ServingData.load(args.serving_data or files.serving_data)
    run = Run(
        dataset=dataset,
        cache=Cache(args.out_dir / f"adversarial_{dataset}_eval.json", args.force),
        work_dir=args.work_dir,
        model_id=sha256_file(checkpoint)[:12],
        recipe=recipe_id(recipe),
        bf16=args.bf16,
        batch=args.batch,
    )
    run.cache.context = {"n": args.n}

    def dnn_accuracy(v: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            return float((dnn(v).argmax(1) == labels).float().mean())

    def cama_classifier(model: ImageCama) -> Classifier:
        return Classifier(
            cama_logits(model, image_split, fixed=False, bf16=args.bf16),
            lambda v, labels: served_accuracy(model, v, labels, k=K, seed=EVAL_SEED),
        )

    baseline = BASELINE[dataset]
    targets = {
        baseline: Classifier(lambda v, d: dnn(v), dnn_accuracy),
        "cama": cama_classifier(cama),
        "cama_fixed": Classifier(
            cama_logits(cama, image_split, fixed=True, bf16=args.bf16),
            fixed_noise_accuracy(cama, image_split, args.batch),
        ),
    }

    def finetune(v_adv: torch.Tensor) -> Tuned:
        tuned, outcome = adapt_as_served(cama, v_adv.numpy(), recipe, gate, serving, keep_refused=True)
        print(
            f"  gate {'accepted' if outcome.accepted else 'refused'}: {outcome.decision.reasons}", flush=True
        )
        served = tuned if outcome.accepted else cama
        return Tuned(
            adapted=cama_classifier(tuned),
            served=cama_classifier(served),
            clean_adapted=partial(served_accuracy, tuned, clean_x, clean_y, k=K, seed=EVAL_SEED),
            clean_served=partial(served_accuracy, served, clean_x, clean_y, k=K, seed=EVAL_SEED),
            accepted=outcome.accepted,
        )

    run.cache.get(run.key(f"clean.{baseline}"), lambda: dnn_accuracy(x, y))
    run.cache.get(
        run.key("clean.cama"), lambda: served_accuracy(cama, x, y, k=K, seed=EVAL_SEED), model=run.model_id
    )
    white_box(run, targets, x, y, bounds=(0.0, 1.0), finetune=finetune)
    run.cache.get(
        run.key("clean_before_ft.cama"),
        partial(served_accuracy, cama, clean_x, clean_y, k=K, seed=EVAL_SEED),
        model=run.model_id,
    )
    if dataset == "mnist":
        sanity_mnist(run, targets, x, y, dnn, finetune, args)
    else:
        transfer(run, targets, x, y)
        more_steps(run, targets, x, y, args.sanity_n)


def transfer(run: Run, targets: dict[str, Classifier], x: torch.Tensor, y: torch.Tensor) -> None:
    """A transfer attack: PGD against the discriminative baseline, scored on the served CAMA."""
    baseline = BASELINE[run.dataset]
    for eps in COSTLY_EPS[run.dataset]:
        name = f"pgd.{eps_key(eps)}.{baseline}"

        attack = attack_of("pgd", eps, run.dataset)

        make = run.perturbation(targets[baseline].logits, x, y, attack)
        run.cache.get(
            run.key(f"pgd.{eps_key(eps)}.cama_transfer"),
            partial(run.scored, name, make, targets["cama"].accuracy, y),
            model=run.model_id,
        )


def sanity_mnist(
    run: Run,
    targets: dict[str, Classifier],
    x: torch.Tensor,
    y: torch.Tensor,
    dnn: torch.nn.Module,
    finetune: Callable[[torch.Tensor], Tuned],
    args: argparse.Namespace,
) -> None:
    """The checks of the module docstring that need attacks of their own."""
    bounds = (0.0, 1.0)
    transfer(run, targets, x, y)  # the white-box figure's DNN examples, scored on the served CAMA
    # the PGD here against foolbox's on the DNN (cross-entropy, same steps and step size)
    for eps in COSTLY_EPS["mnist"]:
        attack = Attack(eps=eps, steps=PGD_STEPS["mnist"], loss="ce")
        ours = batched_perturb(targets["dnn"].logits, x, y, attack, batch=len(x), seed=ATTACK_SEED)
        run.cache.get(
            run.key(f"crosscheck.pgd.{eps_key(eps)}.ours"), partial(targets["dnn"].accuracy, ours, y)
        )
        run.cache.get(
            run.key(f"crosscheck.pgd.{eps_key(eps)}.foolbox"),
            partial(foolbox_pgd_accuracy, dnn, x, y, eps, PGD_STEPS["mnist"]),
        )
    # an adaptive attack through the adaptation, at eps 0.1
    key = run.key("pgd.0.1.cama_ft_adaptive")
    if not run.cache.fresh(key, run.model_id, run.recipe):
        pgd = attack_of("pgd", 0.1, "mnist")
        first = run.examples("pgd.0.1.cama", run.perturbation(targets["cama"].logits, x, y, pgd))
        second = batched_perturb(
            finetune(first).adapted.logits,
            x,
            y,
            pgd,
            batch=run.batch,
            bounds=bounds,
            seed=ATTACK_SEED + 1,
        )
        again = finetune(second)
        run.cache.get(key, partial(again.served.accuracy, second, y), model=run.model_id, recipe=run.recipe)
    # near chance at eps 0.5
    for method in ("dnn", "cama", "cama_fixed"):
        name = f"pgd.{eps_key(CHANCE_EPS)}.{method}"
        make = run.perturbation(targets[method].logits, x, y, attack_of("pgd", CHANCE_EPS, "mnist"))
        run.cache.get(
            run.key(name), partial(run.scored, name, make, targets[method].accuracy, y), model=run.model_id
        )
    more_steps(run, targets, x, y, args.sanity_n)


def more_steps(run: Run, targets: dict[str, Classifier], x: torch.Tensor, y: torch.Tensor, n: int) -> None:
    """PGD with the usual and with 10x the steps at ``STEPS_EPS``, on the first ``n`` images, against
    the baseline and the fixed-noise CAMA (the deterministic targets)."""
    eps = STEPS_EPS[run.dataset]
    for method in (BASELINE[run.dataset], "cama_fixed"):
        for steps in (PGD_STEPS[run.dataset], 10 * PGD_STEPS[run.dataset]):
            name = f"pgd{steps}.{eps_key(eps)}.{method}.first{n}"
            attack = attack_of("pgd", eps, run.dataset, steps=steps)

            make = run.perturbation(targets[method].logits, x[:n], y[:n], attack)
            run.cache.get(
                run.key("sanity", name),
                partial(run.scored, name, make, targets[method].accuracy, y[:n]),
                model=run.model_id,
            )


def foolbox_pgd_accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int
) -> float:
    """Accuracy under foolbox's ``LinfPGD`` (cross-entropy, random start, step 2.5 eps / steps)."""
    import foolbox

    fmodel = foolbox.models.PyTorchModel(model, bounds=(0.0, 1.0))  # type: ignore[attr-defined]
    attack = foolbox.attacks.LinfPGD(abs_stepsize=2.5 * eps / steps, steps=steps, random_start=True)
    torch.manual_seed(ATTACK_SEED)
    _, _, success = attack(fmodel, x, y, epsilons=eps)
    return float(1.0 - success.float().mean())


# --- measurement data ----------------------------------------------------------------------------------


def evaluate_measurement(args: argparse.Namespace) -> None:
    """Fig. 13: attacks on X and C of the appendix-C measurement data, per generator seed."""
    for seed in args.seeds:
        measure_seed(seed, args)


def measure_seed(seed: int, args: argparse.Namespace) -> None:
    """One generator seed of fig. 13: train CAMA and the DNN, attack, fine-tune."""
    from cama.measurement_model import MeasurementCama, MeasurementCamaConfig
    from experiments import measurement_study as em
    from training.measurement_data import make_dataset, schema_dict, to_frame
    from training.measurement_schema import Encoding, TableSchema
    from training.measurement_training import TrainConfig, accuracy, train

    cfg = em.EvalConfig()
    recipe = dataclasses.replace(MEASUREMENT_RECIPE, seed=seed)
    if args.dry_run:  # tiny models and few steps: a smoke run of the whole path
        cfg = dataclasses.replace(
            cfg, tiny=True, train=TrainConfig(epochs=1, val_every=1, val_k=2), dnn=em.DNNTrainConfig(epochs=2)
        )
        recipe = dataclasses.replace(recipe, epochs=1, batch_size=250)
    ds = make_dataset(seed, config=cfg.generator)
    schema = TableSchema.from_dict({**schema_dict(cfg.generator), "classes": [str(i) for i in range(5)]})
    encoding = Encoding.fit(to_frame(ds.train), schema)
    train_data, val_data, test = (encoding.encode(to_frame(d)) for d in (ds.train, ds.val, ds.test))
    run = Run(
        dataset="measurement",
        cache=Cache(args.out_dir / "adversarial_measurement_eval.json", args.force),
        work_dir=args.work_dir,
        model_id=f"seed{seed}",
        recipe=recipe_id(recipe),
        bf16=False,
        batch=len(test),
    )
    prefix = f"s{seed}."
    if all(run.cache.fresh(run.key(f"{prefix}{k}"), run.model_id) for k in ("clean.cama", "done")):
        return
    torch.manual_seed(seed)
    config = MeasurementCamaConfig.tiny() if cfg.tiny else MeasurementCamaConfig()
    cama = MeasurementCama(dataclasses.replace(config, m_pathway=cfg.pathways[0]))
    train(cama, train_data, val_data, dataclasses.replace(cfg.train, seed=seed))
    cama.eval().requires_grad_(False)
    dnn = em.train_dnn(train_data, val_data, cfg.dnn, seed).requires_grad_(False)
    dx = test.x.shape[1]
    a = torch.from_numpy(test.a)
    y = torch.from_numpy(test.y).long()

    def split(v: torch.Tensor, a: torch.Tensor = a) -> tuple[torch.Tensor, Any]:
        return v[:, :dx], (a, v[:, dx:])

    def encoded(v: torch.Tensor) -> Any:
        return dataclasses.replace(test, x=v[:, :dx].numpy(), c=v[:, dx:].numpy())

    def dnn_logits(v: torch.Tensor, draw: int, net: torch.nn.Module = dnn) -> torch.Tensor:
        out: torch.Tensor = net(torch.cat([a, v[:, dx:], v[:, :dx]], 1))
        return out

    def dnn_accuracy(v: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            return float((dnn_logits(v, 0).argmax(1) == labels).float().mean())

    def cama_classifier(model: MeasurementCama) -> Classifier:
        return Classifier(
            cama_logits(model, split, fixed=False, bf16=False),
            lambda v, labels: accuracy(model, encoded(v), k=K, seed=EVAL_SEED),
        )

    targets = {
        "dnn": Classifier(dnn_logits, dnn_accuracy),
        "cama": cama_classifier(cama),
        "cama_fixed": Classifier(
            cama_logits(cama, split, fixed=True, bf16=False), fixed_noise_accuracy(cama, split, len(test))
        ),
    }

    def finetune(v_adv: torch.Tensor) -> Tuned:
        tuned = em.finetuned(
            cama,
            cfg.pathways[0],
            train_data,
            encoded(v_adv),
            recipe,
        ).eval()
        classifier = cama_classifier(tuned)
        clean = partial(accuracy, tuned, test, k=K, seed=EVAL_SEED)
        return Tuned(
            adapted=classifier, served=classifier, clean_adapted=clean, clean_served=clean, accepted=True
        )

    v = torch.from_numpy(np.concatenate([test.x, test.c], 1))
    run.cache.get(run.key(f"{prefix}clean.dnn"), lambda: dnn_accuracy(v, y), model=run.model_id)
    run.cache.get(run.key(f"{prefix}clean.cama"), lambda: targets["cama"].accuracy(v, y), model=run.model_id)
    white_box(run, targets, v, y, bounds=None, finetune=finetune, prefix=prefix)
    run.cache.get(run.key(f"{prefix}done"), lambda: 1.0, model=run.model_id)


# --- outputs --------------------------------------------------------------------------------------------


def figures(dataset: str, out_dir: Path) -> dict[str, float]:
    """Flat keys of one dataset's cache; the measurement figures are means over the seeds measured."""
    path = out_dir / f"adversarial_{dataset}_eval.json"
    if not path.exists():
        return {}
    data = {k: float(v["value"]) for k, v in Cache(path, False).data.items() if not k.endswith(".done")}
    if dataset != "measurement":
        return data
    groups: dict[str, list[float]] = {}
    for key, value in data.items():
        parts = key.split(".")
        groups.setdefault(".".join(parts[:2] + parts[3:]), []).append(value)
    return {k: float(np.mean(v)) for k, v in groups.items()}


def summary(m: dict[str, float], dataset: str) -> dict[str, float]:
    """``clean_after_ft.cama`` (the lowest) and, for images, the sanity checks as 1 (pass) / 0 (fail)."""
    out: dict[str, float] = {}
    for suffix in ("", "_adapted"):
        methods = {f"cama_ft{suffix}", f"cama_ft_eot{suffix}"}
        clean_after = [
            v
            for k, v in m.items()
            if k.startswith(f"adv.{dataset}.clean_after_ft.") and k.rsplit(".", 1)[1] in methods
        ]
        if clean_after:
            out[f"adv.{dataset}.clean_after_ft{suffix}.cama"] = min(clean_after)
    if dataset == "measurement":
        return out
    checks = sanity_checks(m, dataset)
    out.update({f"adv.{dataset}.sanity.{name}": float(ok) for name, (ok, _) in checks.items()})
    return out


def sanity_checks(m: dict[str, float], dataset: str = "mnist") -> dict[str, tuple[bool, str]]:
    """Each sanity check measured for an image data set: (passed, what was compared)."""
    checks: dict[str, tuple[bool, str]] = {}
    rises = []
    pre = f"adv.{dataset}"
    for attack in ATTACKS:
        for method in (BASELINE[dataset], "cama", "cama_fixed", "cama_eot"):
            values = [m.get(f"{pre}.{attack}.{eps_key(e)}.{method}") for e in (*EPS[dataset], CHANCE_EPS)]
            known = [v for v in values if v is not None]
            rises += [b - a for a, b in itertools.pairwise(known)]
    if rises:
        checks["monotone"] = (
            max(rises) <= MONOTONE_SLACK,
            f"largest rise between neighbouring eps {max(rises):+.3f}",
        )
    chance = {k: v for k, v in m.items() if k.startswith(f"{pre}.pgd.{eps_key(CHANCE_EPS)}.")}
    if chance:
        checks["chance_at_0.5"] = (
            max(chance.values()) <= CHANCE_LEVEL,
            ", ".join(f"{k.split('.')[-1]} {v:.3f}" for k, v in chance.items()),
        )
    gains = []
    at = eps_key(STEPS_EPS[dataset])
    for method in (BASELINE[dataset], "cama_fixed"):
        few = [
            v for k, v in m.items() if k.startswith(f"{pre}.sanity.pgd{PGD_STEPS[dataset]}.{at}.{method}.")
        ]
        many = [
            v
            for k, v in m.items()
            if k.startswith(f"{pre}.sanity.pgd{10 * PGD_STEPS[dataset]}.{at}.{method}.")
        ]
        if few and many:
            gains.append((method, many[0] - few[0]))
    if gains:
        checks["more_steps"] = (
            all(g <= 0.01 for _, g in gains),
            ", ".join(f"{name} {g:+.3f}" for name, g in gains),
        )
    transferred = [
        (e, m[f"{pre}.pgd.{eps_key(e)}.cama_transfer"], m[f"{pre}.pgd.{eps_key(e)}.cama_eot"])
        for e in COSTLY_EPS[dataset]
        if f"{pre}.pgd.{eps_key(e)}.cama_transfer" in m and f"{pre}.pgd.{eps_key(e)}.cama_eot" in m
    ]
    if transferred:
        checks["transfer_weaker"] = (
            all(t >= w for _, t, w in transferred),
            ", ".join(f"eps {e:g}: transfer {t:.3f} vs EOT {w:.3f}" for e, t, w in transferred),
        )
    diffs = [
        (
            e,
            m[f"{pre}.crosscheck.pgd.{eps_key(e)}.ours"],
            m[f"{pre}.crosscheck.pgd.{eps_key(e)}.foolbox"],
        )
        for e in COSTLY_EPS[dataset]
        if f"{pre}.crosscheck.pgd.{eps_key(e)}.foolbox" in m
    ]
    if diffs:
        checks["foolbox_within_1pt"] = (
            all(abs(o - f) <= 0.01 for _, o, f in diffs),
            ", ".join(f"eps {e:g}: ours {o:.3f}, foolbox {f:.3f}" for e, o, f in diffs),
        )
    return checks


def methods_of(dataset: str) -> tuple[str, ...]:
    """The figure's methods, the discriminative baseline under its data set's name."""
    return tuple(BASELINE[dataset] if method == "dnn" else method for method in METHODS)


def table(m: dict[str, float], dataset: str) -> str:
    """Markdown: accuracy per attack and eps (rows) and method (columns)."""
    methods = methods_of(dataset)
    lines = [
        f"| attack | eps | {' | '.join(methods)} |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for attack in ATTACKS:
        for eps in EPS[dataset]:
            cells = [m.get(f"adv.{dataset}.{attack}.{eps_key(eps)}.{method}") for method in methods]
            lines.append(
                f"| {attack} | {eps:g} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |"
            )
    return "\n".join(lines)


def plot(m: dict[str, float], dataset: str, path: Path) -> None:
    """Accuracy against eps, one panel per attack, one line per method (figs. 11 and 13)."""
    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(10, 3.8), sharey=True)
    for ax, attack in zip(axes, ATTACKS, strict=True):
        for method in methods_of(dataset):
            points = [
                (e, m[f"adv.{dataset}.{attack}.{eps_key(e)}.{method}"])
                for e in EPS[dataset]
                if f"adv.{dataset}.{attack}.{eps_key(e)}.{method}" in m
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=method)
        ax.set_title(f"{dataset}: {attack.upper()}")
        ax.set_xlabel("eps (L-inf)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, *, metrics_file: bool = True) -> dict[str, float]:
    """The table, the plots and the ``adv.*`` keys of metrics.json from the caches."""
    sections, metrics = [], {}
    for dataset in EPS:
        m = figures(dataset, out_dir)
        if not m:
            continue
        m.update(summary(m, dataset))
        metrics.update(m)
        plot(m, dataset, out_dir / f"adversarial_{dataset}.png")
        sections.append(f"## {dataset}\n\n{table(m, dataset)}\n")
        extra = {k: v for k, v in m.items() if ".cama_transfer" in k or "adaptive" in k or "clean" in k}
        sections.append("\n".join(f"- `{k}`: {v:.3f}" for k, v in sorted(extra.items())) + "\n")
        if dataset != "measurement":
            checks = sanity_checks(m, dataset)
            sections.append(
                "Sanity checks:\n\n"
                + "\n".join(
                    f"- {name}: {'pass' if ok else 'FAIL'} ({what})" for name, (ok, what) in checks.items()
                )
                + "\n"
            )
    text = (
        "# Adversarial robustness\n\nWritten by `python -m experiments.evaluate_adversarial`; the protocol"
        " is in that module's docstring.\n\n"
    )
    atomic_write(out_dir / "adversarial.md", text + "\n".join(sections))
    finite = {k: v for k, v in metrics.items() if math.isfinite(v) and ".sanity.pgd" not in k}
    if metrics_file:
        update_metrics(finite)
    return finite


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(EPS), default=None, help="measure this dataset")
    parser.add_argument("--sections", action="store_true", help="measure nothing; rewrite the outputs")
    add_data_dir_argument(parser)
    parser.add_argument("--checkpoint", default=None, help="images: default models/<dataset>... (IMAGE_DATA)")
    parser.add_argument("--dnn", default=None, help="images: the DNN (MNIST) or CNN (CIFAR-binary) baseline")
    parser.add_argument("--serving-data", default=None, help="images: the replay and canary of the gate")
    parser.add_argument(
        "--recipe", type=json.loads, default={}, help="recipe overrides (JSON) over the checkpoint's own"
    )
    parser.add_argument("--n", type=int, default=50, help="test images attacked")
    parser.add_argument(
        "--clean-n", type=int, default=1000, help="clean test images scored after fine-tuning"
    )
    parser.add_argument("--sanity-n", type=int, default=20, help="images of the 10x-steps check")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="the draw of the MNIST test images")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(MEASUREMENT_SEEDS))
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/adversarial"))
    parser.add_argument("--force", action="store_true", help="ignore the cache")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="measurement: tiny models and few steps; metrics.json untouched",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset in IMAGE_DATA:
        evaluate_images(args, args.dataset)
    elif args.dataset == "measurement":
        evaluate_measurement(args)
    elif not args.sections:
        parser.error("name --dataset, or --sections")
    for key, value in sorted(write_outputs(args.out_dir, metrics_file=not args.dry_run).items()):
        print(f"{key:56s} {value:.4f}")


if __name__ == "__main__":
    main()
