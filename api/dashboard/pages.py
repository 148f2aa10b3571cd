"""`/dashboard/`: server-rendered pages (jinja2) whose small script polls the JSON API, and the
static files they need, plotly.js included, served from the installed `plotly` package (no CDN)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Form, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape

from .. import __version__
from ..errors import NotFound
from ..jobs import get_owned, jobs_public
from ..schemas import JOB_STATUSES
from .session import clear_session, log_in, session_owner, set_session

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
OWN_STATIC = frozenset({"app.js", "style.css"})
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

router = APIRouter(prefix="/dashboard", include_in_schema=False)
templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(HERE / "templates"),
                                            autoescape=select_autoescape(default=True), auto_reload=False))


@lru_cache(maxsize=1)
def plotly_bundle() -> tuple[Path, str]:
    """The `plotly.min.js` bundled in the installed plotly package, and the package version."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `plotly` package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found in the plotly package at {path}")
    return path, importlib.metadata.version("plotly")


def _page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    _, plotly_version = plotly_bundle()
    response = templates.TemplateResponse(request, name, {"version": __version__, "plotly_version": plotly_version,
                                                          **context}, status_code=status_code)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _to_login(request: Request) -> RedirectResponse:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/dashboard/login?next={quote(here, safe='')}", status_code=303)


def _safe_next(target: str | None) -> str:
    """Only paths inside the dashboard (no open redirect to another site)."""
    if target and target.startswith("/dashboard/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/dashboard/jobs"


def _cross_site(request: Request) -> bool:
    """A form posted from another site (browsers send Origin on POST): refused, so that no page
    elsewhere can log a visitor in or out."""
    origin = request.headers.get("origin")
    return origin is not None and urlsplit(origin).netloc != request.headers.get("host")


def _refused(request: Request) -> HTMLResponse:
    return _page(request, "error.html", {"owner": None, "title": "Refused",
                                         "message": "This form was posted from another site."}, 403)


@router.get("")
@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/dashboard/jobs", status_code=303)


@router.get("/login")
def login_page(request: Request, next: Annotated[str | None, Query(max_length=2000)] = None) -> Response:  # noqa: A002
    if session_owner(request) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _page(request, "login.html", {"next": _safe_next(next), "error": None, "owner": None})


@router.post("/login")
def login(request: Request, token: Annotated[str, Form(max_length=500)] = "",
          next: Annotated[str, Form(max_length=2000)] = "") -> Response:  # noqa: A002
    if _cross_site(request):
        return _refused(request)
    owner = log_in(request, token)
    if owner is None:
        error = "Enter your API token." if not token.strip() else "Unknown token: check it and try again."
        return _page(request, "login.html", {"next": _safe_next(next), "error": error, "owner": None}, 401)
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session(response, request, owner)
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    if _cross_site(request):
        return _refused(request)
    response = RedirectResponse("/dashboard/login", status_code=303)
    clear_session(response, request)
    return response


@router.get("/jobs")
def jobs_page(request: Request) -> Response:
    owner = session_owner(request)
    if owner is None:
        return _to_login(request)
    status = request.query_params.get("status")
    return _page(request, "jobs.html", {"owner": owner, "statuses": JOB_STATUSES,
                                        "status": status if status in JOB_STATUSES else ""})


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: Annotated[int, PathParam(ge=1, le=2**62)]) -> Response:
    owner = session_owner(request)
    if owner is None:
        return _to_login(request)
    with request.app.state.sessions() as session:
        try:
            job = jobs_public(session, [get_owned(session, owner.id, job_id)])[0]
        except NotFound as exc:  # another token's job looks exactly like a missing one
            return _page(request, "error.html", {"owner": owner, "title": "Job not found",
                                                 "message": exc.message}, 404)
    return _page(request, "job.html", {"owner": owner, "job": job.model_dump(mode="json")})


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    if name == "plotly.min.js":
        path, _ = plotly_bundle()
        cache = "public, max-age=86400"
    elif name in OWN_STATIC:
        path, cache = STATIC / name, "no-cache"
    else:
        raise NotFound(f"no static file {name!r}.")
    media = "text/javascript" if name.endswith(".js") else "text/css"
    return FileResponse(path, media_type=media, headers={"Cache-Control": cache, "X-Content-Type-Options": "nosniff"})
