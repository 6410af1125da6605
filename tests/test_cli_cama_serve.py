"""``cama-serve``: every subcommand's help runs and says what it does, every subcommand is listed here,
the console script is declared, and ``models`` lists and activates versions of a real store."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from cama_serve.cli import COMMANDS, build_parser
from store.registry import ModelRegistry

ROOT = Path(__file__).resolve().parent.parent

# Every subcommand, with the help of its own subcommands; a new one must be added here and is
# then smoke-run below (Pyro's test_examples style).
SMOKE_TESTED: dict[str, tuple[str, ...]] = {
    "serve": (),
    "worker": (),
    "train": (),
    "evaluate": (),
    "export": (),
    "models": ("list", "activate"),
}


def test_every_subcommand_is_listed_here():
    assert set(COMMANDS) == set(SMOKE_TESTED)


def test_the_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["cama-serve"] == "cama_serve.cli:main"


def test_the_top_level_help_names_every_subcommand(cama_serve):
    out = cama_serve("--help")
    assert out.returncode == 0, out.stderr
    for name, command in COMMANDS.items():
        assert name in out.stdout
        assert command.help in out.stdout


@pytest.mark.parametrize(
    "words",
    [(name, *sub) for name, subs in SMOKE_TESTED.items() for sub in ((), *((s,) for s in subs))],
    ids=lambda words: " ".join(words) or "top",
)
def test_each_subcommand_help_says_what_it_does(cama_serve, words):
    out = cama_serve(*words, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: cama-serve " + " ".join(words))
    if len(words) == 1:
        summary = (COMMANDS[words[0]].run.__doc__ or "").split("\n")[0]
        assert summary
        assert summary.split(":")[0] in " ".join(out.stdout.split())


def test_a_missing_subcommand_is_a_usage_error(cama_serve):
    out = cama_serve()
    assert out.returncode == 2
    assert "COMMAND" in out.stderr


def test_train_needs_a_config():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train"])


def test_models_lists_and_activates_versions(cama_serve, tiny_store):
    registry = ModelRegistry(tiny_store)
    name = registry.models()[0]
    listed = cama_serve("models", "list", "--store", str(tiny_store))
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == [
        {"name": n, "active": registry.active(n), "versions": registry.versions(n)} for n in registry.models()
    ]
    missing = cama_serve("models", "activate", name, "99", "--store", str(tiny_store))
    assert missing.returncode != 0
    assert "99" in missing.stderr
    assert registry.active(name) == registry.versions(name)[-1]  # a failed activation changes nothing
    done = cama_serve("models", "activate", name, str(registry.versions(name)[0]), "--store", str(tiny_store))
    assert done.returncode == 0, done.stderr
    assert registry.active(name) == registry.versions(name)[0]
