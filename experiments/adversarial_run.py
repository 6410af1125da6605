"""One data set's adversarial evaluation at work: the classifiers as the attacker sees them (eq. 6's
log-weights with fresh, fixed or EOT noise), the figure cache and work directory of a run, and the
attack and setting of each (eps, method) pair, and the white-box attacks of every method at every
eps, before and after fine-tuning."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cama.objectives import Noise, bayes_log_weights, sample_noise
from cama.protocol import CamaModel
from cama.runtime import atomic_write
from experiments.adversarial_protocol import (
    ATTACK_SEED,
    ATTACKS,
    BASELINE,
    COSTLY_EPS,
    EOT_DRAWS,
    EPS,
    FIXED_SEED,
    PGD_STEPS,
    K,
    autocast,
    eps_key,
)
from experiments.attacks import Attack, LogitsFn, batched_perturb, strongest
from experiments.eval_cache import Cache

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
