"""``python -m app.seed``: give every configured model an active version from the committed files.

The Docker image runs this at build time so that a container starts with a ready store; the API
does the same at start-up when its store is empty.
"""

from __future__ import annotations

import logging
import sys

from app.core.config import get_settings
from store.artifacts import seed_store
from store.registry import ModelRegistry


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    problems = seed_store(ModelRegistry(settings.model_store), settings.models, settings.seed_dir)
    for name, problem in problems.items():
        print(f"{name}: {problem}", file=sys.stderr)
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
