"""The admin routes: behind the API key (403 without one configured), and what they answer."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from kvos.cluster.admin import add_admin_routes
from kvos.entrypoints.openai_protocol import ProtocolError
from kvos.errors import InvalidRequestError


class StubCluster:
    """The three admin calls of `ClusterEngine`, over a list of ids."""

    def __init__(self) -> None:
        self.ids = [0, 1]

    def instances(self) -> list[dict[str, Any]]:
        return [{"id": i, "state": "healthy"} for i in self.ids]

    def add_instance(self) -> int:
        self.ids.append(max(self.ids) + 1)
        return self.ids[-1]

    def drain_instance(self, instance_id: int) -> int:
        if instance_id not in self.ids:
            raise InvalidRequestError(f"no engine instance {instance_id}", "instance_id")
        self.ids.remove(instance_id)
        return 3


def client(api_key: str | None) -> TestClient:
    app = FastAPI()

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Any, exc: ProtocolError) -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    add_admin_routes(app, StubCluster(), api_key)  # type: ignore[arg-type]
    return TestClient(app)


def test_admin_routes_need_a_configured_key() -> None:
    response = client(None).get("/admin/instances")
    assert response.status_code == 403
    assert "--api-key" in response.json()["error"]["message"]


def test_admin_routes_refuse_a_wrong_key_and_serve_the_right_one() -> None:
    http = client("k")
    assert http.get("/admin/instances").status_code == 401
    assert http.get("/admin/instances", headers={"Authorization": "Bearer nope"}).status_code == 401
    auth = {"Authorization": "Bearer k"}
    assert [i["id"] for i in http.get("/admin/instances", headers=auth).json()["instances"]] == [0, 1]
    assert http.post("/admin/instances", headers=auth).json() == {"id": 2}
    assert http.delete("/admin/instances/0", headers=auth).json() == {"moved": 3}
    refused = http.delete("/admin/instances/7", headers=auth)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "instance_id"
    assert [i["id"] for i in http.get("/admin/instances", headers=auth).json()["instances"]] == [1, 2]
