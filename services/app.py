"""The FastAPI control plane: thin routes over the registry, the scheduler and the run directory files.

Every error has one JSON shape (see `schemas.api.ErrorResponse`):
    {"detail": {"message": "...", "field": "train.lr" | null, "errors": [{"field": ..., "message": ...}, ...]}}
FastAPI's own 422/404/405 answers are rewritten into it, so clients parse one thing.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from fastapi import Body, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.api import (RUN_STATES, Checkpoint, ErrorResponse, Health, MetricsPage, Progress, RolesRequest,
                         RolesState, RolesUpdate, RunDetail, RunList, RunSummary)
from schemas.config import RunConfig
from schemas.modes import mode_spec
from schemas.rundir import RunDir
from schemas.storage import Location, check_location
from services.launcher import RAY_ENTRYPOINT, Launcher, LaunchError, LocalLauncher, RayLauncher
from services.metrics_index import MetricsIndex
from services.registry import Registry, RunRecord
from services.scheduler import Conflict, NotFound, Scheduler, default_max_concurrent, new_run_id, usable_cpus
from services.security import MAX_BODY_BYTES, PathPolicy, PathViolation, token_matches

log = logging.getLogger("lad.serve")

INDEXES_MAX = 64  # runs whose metrics index the control plane keeps (the least recently asked goes first)


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    registry_path: str = "runs/registry.sqlite"
    runs_root: str = "runs"
    data_roots: list[str] = field(default_factory=lambda: ["data"])
    ray_address: Optional[str] = None
    ray_token: Optional[str] = None
    api_token: Optional[str] = None
    max_concurrent: Optional[int] = None          # None: derived, see scheduler.default_max_concurrent
    run_command: Optional[list[str]] = None       # the command a run's config path is appended to (local & Ray)
    stop_grace_s: float = 30.0
    poll_interval_s: float = 1.0


# ---- errors -------------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, field: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def error_body(message: str, field: Optional[str] = None, errors: Optional[list[dict]] = None) -> dict[str, Any]:
    return {"detail": {"message": message, "field": field, "errors": errors or []}}


def _dotted_fields(model: type, prefix: str = "") -> list[str]:
    """Every dotted field path of a pydantic model, deepest first (used to name the field a message is about)."""
    out = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = info.annotation
        for candidate in (ann, *getattr(ann, "__args__", ())):
            if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                out.extend(_dotted_fields(candidate, path + "."))
        out.append(path)
    return sorted(set(out), key=lambda p: (-p.count("."), p))  # deepest first; the same order in every process


_RUN_FIELDS = _dotted_fields(RunConfig)


def _field_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        msg = str(e.get("msg", "invalid"))
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        if e.get("type") == "json_invalid":
            out.append({"field": None, "message": f"body is not valid JSON: {e.get('ctx', {}).get('error', msg)}"})
            continue
        if e.get("type") == "missing" and not loc:  # no body at all: "Field required" would name nothing
            out.append({"field": None, "message": "request body required: a JSON object"})
            continue
        fld = ".".join(loc) or next((f for f in _RUN_FIELDS if f in msg), None)  # model-level checks name it
        out.append({"field": fld, "message": msg})
    return out


def _validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    fe = _field_errors(errors)
    first = fe[0] if fe else {"field": None, "message": "invalid request"}
    where = f"field '{first['field']}': " if first["field"] else ""
    return JSONResponse(status_code=422, content=error_body(where + first["message"], first["field"], fe))


# OpenAPI links: the id POST /runs answers is what the run's own routes take (clients and fuzzers follow them).
RUN_LINKS = {name: {"operationId": op, "parameters": {"run_id": "$response.body#/id"}}
             for name, op in [("GetRun", "get_run_detail_runs__run_id__get"),
                              ("GetMetrics", "get_metrics_runs__run_id__metrics_get"),
                              ("StopRun", "stop_run_runs__run_id__stop_post"),
                              ("GetRoles", "get_roles_runs__run_id__roles_get"),
                              ("PutRoles", "put_roles_runs__run_id__roles_put")]}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        errors = [{"field": exc.field, "message": exc.message}] if exc.status == 422 else []
        return JSONResponse(status_code=exc.status, content=error_body(exc.message, exc.field, errors),
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _validation_response(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 400 and message == "There was an error parsing the body":
            # a body that is not even text: malformed like any other bad JSON, so the same documented 422
            return _validation_response([{"type": "json_invalid", "loc": ("body",), "msg": message,
                                          "ctx": {"error": "not UTF-8 JSON"}}])
        if exc.status_code == 405:  # every method of the path, not just those of the first route that matched it
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.url.path))
        return JSONResponse(status_code=exc.status_code, content=error_body(message), headers=headers or None)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the routes of `path` answer, as the OpenAPI documents them (HEAD is implicit in GET)."""
    methods = set()
    for route in app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods - {"HEAD"})


# ---- middleware ---------------------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`, declared (Content-Length) or streamed (chunked), before any parsing."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        too_big = JSONResponse(status_code=413, content=error_body(
            f"request body larger than {self.max_bytes} bytes"))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    return await too_big(scope, receive, send)
            except ValueError:
                return await JSONResponse(status_code=400, content=error_body("bad Content-Length"))(
                    scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": buffered, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---- conversions ----------------------------------------------------------------------------------------------
def _ts(value: Optional[float]) -> Optional[datetime]:
    return datetime.fromtimestamp(value, timezone.utc) if value is not None else None


def summary(rec: RunRecord) -> RunSummary:
    return RunSummary(id=rec.id, name=rec.name, mode=rec.mode, state=rec.state, created_at=_ts(rec.created_at),
                      started_at=_ts(rec.started_at), finished_at=_ts(rec.finished_at), run_dir=rec.run_dir,
                      launcher=rec.launcher, ray_job_id=rec.ray_job_id, pid=rec.pid,
                      stop_requested=rec.stop_requested_at is not None, error=rec.error)


def detail(rec: RunRecord) -> RunDetail:
    files = RunDir(rec.run_dir)
    progress = files.progress()
    return RunDetail(**summary(rec).model_dump(), config=rec.config,
                     progress=Progress.model_validate(progress) if progress else None,
                     latest_metrics=files.latest_metrics(),
                     checkpoints=[Checkpoint(**c) for c in files.checkpoints()], eval=files.evals())


def roles_state(rec: RunRecord, index: MetricsIndex) -> RolesState:
    """The roles view of a co-learning run: its index's teacher ratios and policy changes, and the request."""
    req = index.run.roles_request()
    requested = (RolesRequest(policy=req["policy"], requested_at=_ts(float(req.get("requested_at") or 0)))
                 if req else None)
    current = index.reported or (requested.policy if requested else None) or rec.config.get("colearn", {}).get(
        "policy", "auto")
    applied = requested is None or index.reported == requested.policy
    return RolesState(run_id=rec.id, policy=current, requested=requested, applied=applied,
                      history=list(index.history), changes=list(index.changes))


# ---- the app --------------------------------------------------------------------------------------------------
def make_launcher(settings: Settings) -> tuple[Launcher, int]:
    if settings.ray_address:
        entrypoint = shlex.join(settings.run_command) if settings.run_command else RAY_ENTRYPOINT
        launcher: Launcher = RayLauncher(settings.ray_address, token=settings.ray_token, entrypoint=entrypoint)
    else:
        launcher = LocalLauncher(command=settings.run_command)
    max_concurrent = settings.max_concurrent or default_max_concurrent(launcher.kind)
    if isinstance(launcher, LocalLauncher):
        launcher.threads_per_run = max(1, usable_cpus() // max_concurrent)
    return launcher, max_concurrent


def create_app(settings: Settings) -> FastAPI:
    """Build the app. Opening the registry takes its lock, so a second server on the same file fails here."""
    for root in [settings.runs_root, *settings.data_roots]:
        check_location(root, "--runs-root" if root == settings.runs_root else "--data-root")
    Location(settings.runs_root).mkdir()  # on object storage: nothing to make
    for root in settings.data_roots:
        if not Location(root).remote and not os.path.isdir(root):
            log.warning("data root %s does not exist (yet)", root)
    registry = Registry(settings.registry_path)
    launcher, max_concurrent = make_launcher(settings)
    scheduler = Scheduler(registry, launcher, max_concurrent, stop_grace_s=settings.stop_grace_s)
    paths = PathPolicy(settings.data_roots, settings.runs_root)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(scheduler.recover)
        app.state.loop = asyncio.get_running_loop()
        app.state.wake = asyncio.Event()
        task = asyncio.create_task(scheduler.run_forever(app.state.wake, settings.poll_interval_s))
        log.info("control plane up: %s launcher, max %d concurrent runs, runs root %s, data roots %s",
                 launcher.kind, max_concurrent, paths.runs_root, ", ".join(paths.data_roots))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            registry.close()

    app = FastAPI(title="LAD control plane", version="1", lifespan=lifespan,
                  description="Start, watch and steer label-assignment-distillation training runs. "
                              "Errors: `{\"detail\": {\"message\", \"field\", \"errors\"}}`.",
                  responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                             422: {"model": ErrorResponse}})
    app.state.settings, app.state.scheduler, app.state.registry = settings, scheduler, registry
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    install_error_handlers(app)

    bearer = HTTPBearer(auto_error=False, description="the API token (`LAD_API_TOKEN` / `--token-file`)")

    def require_token(request: Request, _=Depends(bearer)) -> None:
        if settings.api_token is None:
            return
        if not token_matches(settings.api_token, request.headers.get("authorization")):
            raise ApiError(401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    def wake_scheduler() -> None:
        loop = getattr(app.state, "loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(app.state.wake.set)

    def get_run(run_id: str) -> RunRecord:
        rec = registry.get(run_id)
        if rec is None:
            raise ApiError(404, f"no run {run_id!r}", "id")
        return rec

    indexes: OrderedDict[tuple[str, str], MetricsIndex] = OrderedDict()
    indexes_lock = threading.Lock()

    @contextlib.contextmanager
    def indexed(rec: RunRecord) -> Iterator[MetricsIndex]:
        """The run's metrics index, brought up to date and held for the caller (`services.metrics_index`)."""
        key = (rec.id, str(rec.run_dir))
        with indexes_lock:
            index = indexes.pop(key, None) or MetricsIndex(RunDir(rec.run_dir))
            indexes[key] = index
            while len(indexes) > INDEXES_MAX:
                indexes.popitem(last=False)
        with index.lock:
            index.refresh()
            yield index

    mutating = [Depends(require_token)]

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        counts = registry.count_by_state()
        return Health(launcher=launcher.kind, ray_address=settings.ray_address,
                      ray_reachable=scheduler.launcher_reachable if launcher.kind == "ray" else None,
                      max_concurrent=max_concurrent, runs={s: counts.get(s, 0) for s in RUN_STATES})

    @app.post("/runs", status_code=201, response_model=RunSummary, dependencies=mutating, tags=["runs"],
              responses={201: {"links": RUN_LINKS}, 409: {"model": ErrorResponse}, 413: {"model": ErrorResponse}})
    def create_run(response: Response, cfg: RunConfig = Body(
            ..., description="a run config, as in configs/*.yaml; `name` defaults to the run id")) -> RunSummary:
        run_id = new_run_id()
        raw = cfg.to_dict()
        if "name" not in cfg.model_fields_set:
            raw["name"] = run_id
        if (raw.get("pipeline") or {}).get("ray_address"):
            raise ApiError(422, "set by the control plane (runs go where the server sends them); leave it unset",
                           "pipeline.ray_address")
        try:
            raw = paths.confine(raw, output_dir_given="output_dir" in cfg.model_fields_set)
        except PathViolation as e:
            raise ApiError(422, f"field '{e.field}': {e.message}", e.field) from None
        try:
            final = RunConfig.model_validate(raw)
        except ValidationError as e:  # cannot happen for a config that validated before; answer 422 anyway
            return _validation_response(list(e.errors()))
        try:
            rec = scheduler.submit(final, run_id)
        except Conflict as e:
            raise ApiError(409, str(e), e.field) from None
        except OSError as e:
            raise ApiError(500, f"cannot write the run directory: {e}") from None
        wake_scheduler()
        response.headers["Location"] = f"/runs/{rec.id}"
        return summary(rec)

    @app.get("/runs", response_model=RunList, tags=["runs"])
    def list_runs(state: Optional[str] = Query(None, description="only runs in this state",
                                               pattern="^(" + "|".join(RUN_STATES) + ")$"),
                  limit: int = Query(100, ge=1, le=1000)) -> RunList:
        recs = registry.list([state] if state else None, limit=limit)
        return RunList(runs=[summary(r) for r in recs])

    @app.get("/runs/{run_id}", response_model=RunDetail, tags=["runs"])
    def get_run_detail(run_id: str) -> RunDetail:
        return detail(get_run(run_id))

    @app.post("/runs/{run_id}/stop", status_code=202, response_model=RunSummary, dependencies=mutating,
              tags=["runs"], responses={409: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    def stop_run(run_id: str) -> RunSummary:
        try:
            return summary(scheduler.stop(run_id))
        except NotFound:
            raise ApiError(404, f"no run {run_id!r}", "id") from None
        except Conflict as e:
            raise ApiError(409, str(e), "state") from None
        except LaunchError as e:
            raise ApiError(503, f"cannot stop the run now: {e}") from None

    @app.get("/runs/{run_id}/metrics", response_model=MetricsPage, tags=["runs"])
    def get_metrics(run_id: str,
                    since: Optional[int] = Query(None, description="return records with step > since (the last "
                                                                   "step you have); omit for the first page"),
                    limit: int = Query(1000, ge=1, le=10_000)) -> MetricsPage:
        rec = get_run(run_id)
        with indexed(rec) as index:
            items, more = index.page(since, limit)
        next_since = items[-1].get("step") if items else since
        return MetricsPage(run_id=rec.id, items=items, next_since=next_since, has_more=more)

    @app.get("/runs/{run_id}/roles", response_model=RolesState, tags=["co-learning"],
             responses={409: {"model": ErrorResponse}})
    def get_roles(run_id: str) -> RolesState:
        rec = get_run(run_id)
        if not mode_spec(rec.mode).co_learning:
            raise ApiError(409, f"run {run_id} is mode {rec.mode!r}; roles exist only for colad runs", "mode")
        with indexed(rec) as index:
            return roles_state(rec, index)

    @app.put("/runs/{run_id}/roles", response_model=RolesState, dependencies=mutating, tags=["co-learning"],
             responses={409: {"model": ErrorResponse}})
    def put_roles(run_id: str, update: RolesUpdate) -> RolesState:
        rec = get_run(run_id)
        if not mode_spec(rec.mode).co_learning:
            raise ApiError(409, f"run {run_id} is mode {rec.mode!r}; roles exist only for colad runs", "mode")
        if rec.state != "running":
            raise ApiError(409, f"run {run_id} is {rec.state}; the policy can change only while it runs", "state")
        RunDir(rec.run_dir).request_roles(update.policy)
        log.info("run %s: role policy %s requested", run_id, update.policy)
        with indexed(rec) as index:
            return roles_state(rec, index)

    ui_pages(app)
    return app


UI_DIR = Path(__file__).resolve().parent / "ui"
UI_STATIC = {"common.js": "text/javascript", "style.css": "text/css"}


def ui_pages(app: FastAPI) -> None:
    """The browser pages (`services/ui/`): `/` lists the runs, `/ui/runs/{id}` shows one. Static files that call
    the JSON API from the browser; they hold no data and need no token to load (mutations ask for it)."""

    def page(name: str) -> HTMLResponse:
        return HTMLResponse((UI_DIR / name).read_text(), headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return page("index.html")

    @app.get("/ui/runs/{run_id}", include_in_schema=False)
    def run_page(run_id: str) -> HTMLResponse:
        return page("run.html")

    @app.get("/ui/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in UI_STATIC:
            raise ApiError(404, f"no file {name!r}", "name")
        return Response((UI_DIR / name).read_text(), media_type=UI_STATIC[name],
                        headers={"Cache-Control": "no-cache"})
