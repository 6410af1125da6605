"""Dependencies of the routes, as ``Annotated`` aliases."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.parsing import Decoder
from app.auto_adapt import AutoAdapter
from app.core.config import Settings
from app.errors import AuthError
from app.jobs import JobService
from app.model_server import ModelServer
from app.state import AppState
from store.errors import UnavailableError
from store.registry import ModelRegistry

_bearer = HTTPBearer(auto_error=False, description="The management token (CAMA_TOKEN)")


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "cama", None)
    if state is None:
        raise UnavailableError("the service is starting", reason="starting")
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_server(state: StateDep) -> ModelServer:
    return state.server


def get_registry(state: StateDep) -> ModelRegistry:
    return state.registry


def get_jobs(state: StateDep) -> JobService:
    return state.jobs


def get_decoder(state: StateDep) -> Decoder:
    return state.decoder


def get_auto(state: StateDep) -> AutoAdapter:
    return state.auto


def require_token(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Management endpoints: 401 without a bearer token, 403 with a wrong one."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise AuthError(
            "a bearer token is required", reason="missing_token", headers={"WWW-Authenticate": "Bearer"}
        )
    if not secrets.compare_digest(credentials.credentials.encode(), state.token.encode()):
        raise AuthError("invalid token", reason="invalid_token", status_code=403)


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServerDep = Annotated[ModelServer, Depends(get_server)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
DecoderDep = Annotated[Decoder, Depends(get_decoder)]
TokenDep = Annotated[None, Depends(require_token)]
AutoAdaptDep = Annotated[AutoAdapter, Depends(get_auto)]
