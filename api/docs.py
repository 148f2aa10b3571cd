"""`/docs` without internet: Swagger UI's assets served from the installed `swagger-ui-py` package
(as the dashboard serves plotly.js from `plotly`), and `JobCreate`, the JSON `spec` part of
`POST /v1/jobs`, published in the OpenAPI components so its fields are discoverable."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse

from .errors import NotFound
from .schemas import JobCreate

ASSETS = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "swagger-ui-bundle.js.map",
                    "swagger-ui.css.map"})
MEDIA = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".map": "application/json"}


@lru_cache(maxsize=1)
def swagger_ui_static() -> Path:
    """The folder of Swagger UI's built assets in the installed `swagger-ui-py` package."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `swagger-ui-py` package is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    if not (folder / "swagger-ui-bundle.js").is_file():
        raise FileNotFoundError(f"swagger-ui-bundle.js not found in the swagger-ui-py package at {folder}")
    return folder


def install_docs(app: FastAPI) -> None:
    """`GET /docs` (Swagger UI, every asset under `/docs/static/`) and the OpenAPI document with
    `JobCreate` in its components. The app must be created with `docs_url=None, redoc_url=None`."""

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
                                   swagger_js_url="/docs/static/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/static/swagger-ui.css",
                                   swagger_favicon_url="/docs/static/favicon-32x32.png")

    @app.get("/docs/static/{name}", include_in_schema=False)
    def docs_static(name: str) -> FileResponse:
        if name not in ASSETS or not (swagger_ui_static() / name).is_file():
            raise NotFound(f"no docs asset {name!r}.")
        return FileResponse(swagger_ui_static() / name, media_type=MEDIA[Path(name).suffix],
                            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = publish_job_create(schema)
        return app.openapi_schema

    app.openapi = openapi


def publish_job_create(schema: dict[str, Any]) -> dict[str, Any]:
    """`JobCreate` (and the models it uses) in `components.schemas`; the multipart `spec` part of
    `POST /v1/jobs` says it is JSON of that schema (OpenAPI 3.1 `contentMediaType`/`contentSchema`)."""
    job_create = JobCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(job_create.pop("$defs", {}))
    schemas["JobCreate"] = job_create
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    form = schemas[body["schema"]["$ref"].rsplit("/", 1)[1]]
    form["properties"]["spec"].update({"contentMediaType": "application/json",
                                       "contentSchema": {"$ref": "#/components/schemas/JobCreate"}})
    body.setdefault("encoding", {})["spec"] = {"contentType": "application/json"}
    return schema
