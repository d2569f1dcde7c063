"""One error body for every non-2xx answer: ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}``.

Known failures map to 4xx / 503; anything unexpected is logged with a reference id and answered 503
(never a bare 500 with an HTML page or a traceback).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.backends import TrackingError
from service.core.jobs import RayJobError, RayUnavailable
from service.core.store import IdempotencyConflict, StudyNotFound

log = logging.getLogger("service.api")


class ApiError(Exception):
    """An error with an HTTP status and a located message."""

    def __init__(
        self,
        status_code: int,
        msg: str,
        loc: list[Any] | None = None,
        type: str = "error",  # noqa: A002
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(msg)
        self.status_code = status_code
        self.msg = msg
        self.loc = loc or []
        self.type = type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"detail": [{"loc": self.loc, "msg": self.msg, "type": self.type}]}


class StateConflict(ApiError):
    def __init__(self, msg: str) -> None:
        super().__init__(409, msg, ["path", "study_id"], "state_conflict")


def error_body(loc: list[Any], msg: str, type: str) -> dict[str, Any]:  # noqa: A002
    return {"detail": [{"loc": loc, "msg": msg, "type": type}]}


PROBED_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def allowed_methods(req: Request) -> list[str]:
    """Every method some route fully matches for ``req``'s path (probed method by method: included
    routers are opaque groups in FastAPI's router)."""
    from starlette.routing import Match

    scope = {k: v for k, v in req.scope.items() if k not in ("endpoint", "route", "path_params")}
    return [
        m for m in PROBED_METHODS
        if any(route.matches({**scope, "method": m})[0] == Match.FULL for route in req.app.router.routes)
    ]


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


def _clean_validation_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        loc = list(e.get("loc", []))
        msg = str(e.get("msg", ""))
        typ = str(e.get("type", "value_error"))
        if typ == "json_invalid":
            pos = (e.get("ctx") or {}).get("error", "")
            msg = f"malformed JSON body: {pos}" if pos else "malformed JSON body"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        elif typ == "extra_forbidden":
            msg = f"unknown field {loc[-1]!r} (extra fields are not permitted)" if loc else msg
        out.append({"loc": loc, "msg": msg, "type": typ})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return _json(422, {"detail": _clean_validation_errors(list(exc.errors()))})

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return _json(exc.status_code, exc.body(), exc.headers)

    @app.exception_handler(StudyNotFound)
    async def _not_found(_req: Request, exc: StudyNotFound) -> JSONResponse:
        return _json(404, error_body(["path", "study_id"], str(exc), "not_found"))

    @app.exception_handler(IdempotencyConflict)
    async def _idem(_req: Request, exc: IdempotencyConflict) -> JSONResponse:
        return _json(
            409,
            error_body(
                ["header", "Idempotency-Key"],
                f"Idempotency-Key {exc.args[0]!r} was already used with a different request body",
                "idempotency_conflict",
            ),
        )

    @app.exception_handler(RayUnavailable)
    async def _ray_down(_req: Request, exc: RayUnavailable) -> JSONResponse:
        return _json(503, error_body(["ray"], str(exc), "ray_unavailable"), {"Retry-After": "5"})

    @app.exception_handler(RayJobError)
    async def _ray_err(_req: Request, exc: RayJobError) -> JSONResponse:
        return _json(502, error_body(["ray"], str(exc), "ray_job_error"))

    @app.exception_handler(TrackingError)
    async def _mlflow_down(_req: Request, exc: TrackingError) -> JSONResponse:
        return _json(503, error_body(["mlflow"], str(exc), "mlflow_unavailable"), {"Retry-After": "5"})

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _db_down(_req: Request, exc: Exception) -> JSONResponse:
        log.warning("the study store is not reachable: %s", type(exc).__name__)
        return _json(503, error_body(["store"], "the study store's database is not reachable (restarting?); "
                                     "retry in a few seconds", "database_unavailable"), {"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette's Allow names only the first route of the path: list all
            allowed = allowed_methods(req)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            return _json(405, error_body(
                ["method"], f"{req.method} is not allowed on {req.url.path} (allowed: {', '.join(allowed)})",
                "method_not_allowed"), headers)
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI's "error parsing the body" for a JSON body that is not UTF-8: malformed JSON, 422
            return _json(422, error_body(["body"], f"malformed JSON body: not UTF-8 ({exc.__cause__.reason})",
                                         "json_invalid"))
        if isinstance(detail, list):
            body = {"detail": detail}
        else:
            body = error_body([], str(detail), "http_error")
        return _json(exc.status_code, body, headers)

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:8]
        log.exception("unexpected error [ref %s] on %s %s", ref, req.method, req.url.path)
        return _json(
            503,
            error_body([], f"internal error ({exc.__class__.__name__}); see the API log, ref {ref}", "internal_error"),
        )
