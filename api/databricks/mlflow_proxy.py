"""MLflow's REST API at the workspace address: the SDK's MLflow client (tracking URI `databricks`) checks the
experiment path and custom_weights_path there. Forwarded as it is to Tessera's MLflow server."""

import httpx
from fastapi import APIRouter, Request, Response

from flows import services
from tasks import tracking

router = APIRouter()
HOP_BY_HOP = {"host", "authorization", "content-length", "connection", "transfer-encoding", "accept-encoding"}


def mlflow_server() -> str:
    """The MLflow server Tessera tracks runs in: MLFLOW_TRACKING_URI when it is one, else the embedded UI's."""
    uri = tracking.tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else services.mlflow_ui_url()


@router.api_route("/api/2.0/mlflow/{path:path}", methods=["GET", "POST", "PATCH", "DELETE"])
async def forward(path: str, request: Request) -> Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    async with httpx.AsyncClient(timeout=60) as http:
        answer = await http.request(request.method, f"{mlflow_server()}/api/2.0/mlflow/{path}",
                                    params=request.query_params, content=await request.body(), headers=headers)
    return Response(answer.content, status_code=answer.status_code,
                    media_type=answer.headers.get("content-type"))
