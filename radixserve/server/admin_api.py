"""Operational routes: /health, /metrics (Prometheus), POST /reset_prefix_cache (admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from radixserve.server.state import get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the engine thread runs (no authentication: load balancers probe it)."""
    state = get_state(request)
    if not state.async_engine.is_running:
        return JSONResponse({"status": "error", "message": "the engine is not running"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    snapshot = await state.async_engine.call(state.engine.snapshot)
    body = state.metrics.render(snapshot, named_caches=len(state.caches))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request) -> JSONResponse:
    """Drop every cached block no running request uses (pins included). Needs an API key
    when keys are configured. Named caches survive as records and re-pin on their next use."""
    state = get_state(request)
    state.auth.authenticate(request)
    freed = await state.async_engine.call(state.engine.reset_prefix_cache)
    return JSONResponse({"freed_blocks": freed})
