"""Admin HTTP routes of a cluster: list, add and drain engine instances at run time.

    GET    /admin/instances        each instance's id, state, requests, freeness, restarts
    POST   /admin/instances        start one more instance            -> {"id": N}
    DELETE /admin/instances/{id}   drain it: its requests move, then it stops  -> {"moved": K}

They change what the server runs, so they need the API key; a server started
without one answers them 403.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, FastAPI

from kvos.cluster.client import ClusterEngine
from kvos.entrypoints.openai_protocol import ProtocolError
from kvos.entrypoints.server.plumbing import api_key_check


def add_admin_routes(app: FastAPI, engine: ClusterEngine, api_keys: tuple[str, ...]) -> None:
    async def require_key_set() -> None:
        if not api_keys:
            raise ProtocolError(
                403, "Admin routes need the server started with --api-key.", type="permission_error", code="forbidden"
            )

    router = APIRouter(prefix="/admin", dependencies=[Depends(require_key_set), Depends(api_key_check(api_keys))])

    async def list_instances() -> dict[str, Any]:
        return {"instances": await asyncio.to_thread(engine.instances)}

    async def add_instance() -> dict[str, Any]:
        return {"id": await asyncio.to_thread(engine.add_instance)}

    async def drain_instance(instance_id: int) -> dict[str, Any]:
        try:
            moved = await asyncio.to_thread(engine.drain_instance, instance_id)
        except ValueError as exc:
            raise ProtocolError(400, str(exc), param="instance_id") from exc
        return {"moved": moved}

    router.add_api_route("/instances", list_instances, methods=["GET"])
    router.add_api_route("/instances", add_instance, methods=["POST"])
    router.add_api_route("/instances/{instance_id}", drain_instance, methods=["DELETE"])
    app.include_router(router)
