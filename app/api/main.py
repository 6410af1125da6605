"""All routers."""

from fastapi import APIRouter

from app.api.routes import adapt, health, jobs, metrics, models, predict

api_router = APIRouter()
for module in (predict, adapt, jobs, models, health, metrics):
    api_router.include_router(module.router)
