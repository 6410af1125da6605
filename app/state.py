"""What one API process holds while it runs, built in the app's lifespan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from app.api.parsing import Decoder
from app.auto_adapt import AutoAdapter
from app.core.config import Settings
from app.jobs import JobService
from app.metrics import ServiceMetrics
from app.model_server import ModelServer
from store.registry import ModelRegistry


@dataclass
class AppState:
    settings: Settings
    registry: ModelRegistry
    metrics: ServiceMetrics
    server: ModelServer
    jobs: JobService
    token: str
    decoder: Decoder
    auto: AutoAdapter
    notify: Callable[[str, int], None] = field(default=lambda model, version: None)
