"""All routers."""

from fastapi import APIRouter

from app.api.routes import adapt, health, jobs, metrics, models, predict, v2

api_router = APIRouter()
for module in (predict, adapt, jobs, models, health, metrics, v2):
    api_router.include_router(module.router)
