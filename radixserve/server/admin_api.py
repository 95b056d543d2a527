"""Operational routes: /health, /metrics (Prometheus), POST /reset_prefix_cache (admin)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from radixserve.server.state import get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the engine runs; 503 once it stopped or its process died (no authentication:
    load balancers probe it)."""
    state = get_state(request)
    if not state.async_engine.is_running:
        return JSONResponse({"status": "error", "message": "the engine is not running"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text. Open by default (scrapers expect it); with --metrics-key, it needs a
    metrics or admin key (a scraper's bearer_token)."""
    state = get_state(request)
    state.auth.authenticate_metrics(request)
    snapshot = await state.async_engine.snapshot()
    body = state.metrics.render(snapshot, named_caches=len(state.caches))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request) -> JSONResponse:
    """Drop every cached block no running request uses (pins included): every tenant's. With
    keys configured it needs an admin key (401 without a key, 403 with a tenant's key); with
    none configured the server is open and so is this. Named caches survive as records and
    re-pin on their next use."""
    state = get_state(request)
    state.auth.authenticate_admin(request)
    freed = await state.async_engine.reset_prefix_cache()
    state.keeper.mark_dirty()  # the pins are gone: a restart must not bring them back
    return JSONResponse({"freed_blocks": freed})
