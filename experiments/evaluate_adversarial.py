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
``adversarial_measurement.png`` (fig. 13). The constants named here live in
``experiments.adversarial_protocol``, the attacks' machinery in ``experiments.adversarial_run`` and
the outputs in ``experiments.adversarial_report``; this module measures the images and the
measurement data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cama.adapt import MEASUREMENT_RECIPE, FinetuneConfig, GateConfig
from cama.checkpoint import load_checkpoint, sha256_file
from cama.image_model import ImageCama
from experiments.adversarial_protocol import (
    ATTACK_SEED,
    BASELINE,
    CHANCE_EPS,
    COSTLY_EPS,
    EPS,
    EVAL_SEED,
    IMAGE_DATA,
    MEASUREMENT_SEEDS,
    PGD_STEPS,
    RESULTS,
    STEPS_EPS,
    K,
    eps_key,
)
from experiments.adversarial_report import write_outputs
from experiments.adversarial_run import (
    Classifier,
    Run,
    Tuned,
    attack_of,
    cama_logits,
    fixed_noise_accuracy,
    white_box,
)
from experiments.attacks import Attack, batched_perturb
from experiments.eval_cache import Cache, recipe_id
from experiments.experiment import adapt_as_served
from store.data import ServingData
from training.accuracy import served_accuracy
from training.baselines import load_baseline
from training.data import add_data_dir_argument, load_dataset

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
