"""``cama-serve``: serve, run the worker, train from a config, evaluate, export, manage versions.

    cama-serve serve --port 8000                      # the API (python -m app)
    cama-serve worker                                 # the Celery worker that runs /adapt jobs
    cama-serve train --config configs/mnist.toml      # rebuild models/mnist_cama.pt
    cama-serve train --config configs/images.toml --data my_images/ --out models/mine.pt
    cama-serve evaluate --checkpoint models/mine.pt   # clean accuracy as POST /predict computes it
    cama-serve export --checkpoint models/mine.pt --name mine --store model_store
    cama-serve models list --store model_store
    cama-serve models activate mine 1 --store model_store

A thin shell: each subcommand calls the module that implements it (``app``, ``worker``,
``training.run_config`` and the trainers, ``training.export_model``, ``store.registry``).
``train``, ``evaluate`` and ``export`` need the ``train`` extra; the others only the service.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_ENV = "CAMA_MODEL_STORE"


def _store(value: str | None) -> Path:
    return Path(value or os.environ.get(STORE_ENV) or "model_store")


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", default=None, help=f"model store directory (default ${STORE_ENV} or model_store)"
    )


# --- serve, worker ---------------------------------------------------------------------------


def _serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="bind address (default $CAMA_HOST or the settings')")
    parser.add_argument("--port", type=int, default=None, help="port (default $CAMA_PORT or 8000)")
    _add_store(parser)


def serve(args: argparse.Namespace) -> None:
    """The API with the settings from the environment (``CAMA_*``), as ``python -m app`` runs it."""
    for key, value in (("CAMA_HOST", args.host), ("CAMA_PORT", args.port), (STORE_ENV, args.store)):
        if value is not None:
            os.environ[key] = str(value)
    from app.__main__ import main as serve_main

    serve_main()


def _worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=1, help="worker processes (one per device)")
    parser.add_argument("--pool", default="prefork", help="Celery pool (prefork, solo)")
    parser.add_argument("--loglevel", default="INFO")


def worker(args: argparse.Namespace) -> None:
    """The Celery worker that runs adaptation jobs (needs ``CAMA_REDIS_URL``)."""
    from worker.celery_app import celery_app

    celery_app.worker_main(
        ["worker", f"--pool={args.pool}", f"--concurrency={args.concurrency}", f"--loglevel={args.loglevel}"]
    )


# --- train, evaluate, export -----------------------------------------------------------------


def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="a recipe file, configs/<name>.toml")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every training stage")
    parser.add_argument("--limit", type=int, default=None, help="train and score on the first N images (CI)")
    parser.add_argument("--out", default=None, help="the checkpoint to write (default: the config's out)")
    parser.add_argument(
        "--data",
        default=None,
        help="your own images: a folder with one subfolder of PNG/JPEG files per class, or an .npz",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (every stage)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (every stage)")


def _run_trainer(module: str, argv: list[str]) -> None:
    status = importlib.import_module(module).main(argv)
    if status:
        raise SystemExit(status)


def train(args: argparse.Namespace) -> None:
    """Run a config's stages; the checkpoint records the config it came from."""
    from training.run_config import Overrides, load_config, run_stages

    overrides = Overrides(
        epochs=args.epochs,
        limit=args.limit,
        out=args.out,
        data=args.data,
        device=args.device,
        threads=args.threads,
    )
    run = overrides.apply(load_config(args.config))
    print(f"wrote {run_stages(run, _run_trainer, overrides)}")


def _evaluate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument(
        "--data",
        default=None,
        help="score on these images (a folder of class subfolders named as the model's classes, or an "
        ".npz); default: the test split of the checkpoint's data set",
    )
    parser.add_argument("--data-dir", default=None, help="where the named data sets live ($CAMA_DATA_DIR)")
    parser.add_argument("--k", type=int, default=10, help="eq. 6 importance samples per class")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--limit", type=int, default=None, help="score the first N images only")
    parser.add_argument("--threads", type=int, default=None)


def evaluate(args: argparse.Namespace) -> None:
    """Clean accuracy of an image checkpoint: a CAMA's with the numerics of ``POST /predict`` (eq. 6,
    K samples behind the first-sample screen), a baseline's arg-max."""
    import torch

    from cama.checkpoint import load_checkpoint
    from cama.image_model import ImageCama
    from training.accuracy import served_accuracy
    from training.baselines import BASELINES, evaluate_accuracy
    from training.data import Split, recorded_test_split

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(args.checkpoint)
    split = recorded_test_split(meta.provenance, args.data, args.data_dir)
    split = Split(split.x[: args.limit], split.y[: args.limit])
    if isinstance(model, ImageCama):
        accuracy = served_accuracy(model, split.x, split.y, k=args.k, seed=args.seed)
    elif meta.kind in BASELINES:
        accuracy = evaluate_accuracy(model, split.x, split.y)
    else:
        raise SystemExit(
            f"{args.checkpoint}: a {meta.kind} model; "
            "score tables with python -m training.train_measurement predict"
        )
    print(json.dumps({"checkpoint": str(args.checkpoint), "images": len(split), "accuracy": accuracy}))


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--name", required=True, help="the model's name in the store (and in requests)")
    _add_store(parser)
    parser.add_argument(
        "--serving-data",
        type=Path,
        default=None,
        help="replay and canary data (default <checkpoint dir>/<name>_serving_data.npz, built if missing)",
    )
    parser.add_argument("--no-activate", action="store_true", help="publish without making it active")


def export(args: argparse.Namespace) -> None:
    """Publish a checkpoint (with its ONNX export and serving data) as a new version in a store."""
    from training.export_model import export as export_model

    manifest = export_model(
        args.checkpoint,
        args.name,
        _store(args.store),
        serving_data=args.serving_data,
        activate=not args.no_activate,
    )
    print(json.dumps({"name": manifest.name, "version": manifest.version, "active": not args.no_activate}))


# --- models ----------------------------------------------------------------------------------


def _models_args(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every model in the store, its versions and the active one")
    _add_store(listing)
    activate = actions.add_parser("activate", help="make a published version the active one")
    activate.add_argument("name")
    activate.add_argument("version", type=int)
    _add_store(activate)


def models(args: argparse.Namespace) -> None:
    """List a store's models and versions, or activate a version (verified first)."""
    from store.errors import DomainError
    from store.registry import ModelRegistry

    registry = ModelRegistry(_store(args.store))
    if args.action == "activate":
        try:
            with registry.lock(args.name):
                manifest = registry.activate(args.name, args.version)
        except DomainError as exc:
            raise SystemExit(f"cama-serve models activate: {exc} ({exc.reason})") from exc
        print(json.dumps({"name": manifest.name, "active": manifest.version}))
        return
    listing = [
        {"name": name, "active": registry.active(name), "versions": registry.versions(name)}
        for name in registry.models()
    ]
    print(json.dumps(listing, indent=2))


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, its options, and what it runs."""

    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


COMMANDS: dict[str, Command] = {
    "serve": Command("serve the API (python -m app) with the CAMA_* settings", _serve_args, serve),
    "worker": Command("run the Celery worker that executes /adapt jobs", _worker_args, worker),
    "train": Command("train a model from a config file (configs/*.toml)", _train_args, train),
    "evaluate": Command(
        "clean accuracy of a checkpoint, as POST /predict computes it", _evaluate_args, evaluate
    ),
    "export": Command("publish a checkpoint into a model store", _export_args, export),
    "models": Command("list a store's models, or activate a version", _models_args, models),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``cama-serve`` parser, one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="cama-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.run.__doc__)
        command.add_args(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``cama-serve``."""
    args: Any = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    COMMANDS[args.command].run(args)
