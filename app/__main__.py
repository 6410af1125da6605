"""``python -m app``: serve with the settings from the environment (embedded worker when no Redis)."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from app.core.config import get_settings


def main() -> None:
    try:
        settings = get_settings()
    except ValidationError as exc:
        print(f"refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
    )


if __name__ == "__main__":
    main()
