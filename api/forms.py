"""Strict multipart forms: a text part that is not valid text is refused, not guessed.

Starlette decodes a multipart text field with the request's charset (UTF-8 unless the
Content-Type says otherwise) and, when that fails, silently falls back to latin-1: a job spec
sent in another encoding would be stored as mojibake. `StrictFormRoute` (the `route_class` of
the routers that take forms) parses multipart bodies with a parser that refuses such a part with
`400 bad_request` naming it. File parts are bytes and are not decoded.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header


class StrictMultiPartParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset or "utf-8")
            except (UnicodeDecodeError, LookupError):
                raise MultiPartException(f"form field {part.field_name!r} is not valid "
                                         f"{self._charset or 'utf-8'} text.") from None
        super().on_part_end()


class StrictFormRequest(Request):
    async def _get_form(self, *, max_files: int | float = 1000, max_fields: int | float = 1000,
                        max_part_size: int = 1024 * 1024) -> Any:
        if self._form is None:
            content_type, _ = parse_options_header(self.headers.get("Content-Type"))
            if content_type == b"multipart/form-data":
                try:
                    async with aclosing(self.stream()) as stream:
                        parser = StrictMultiPartParser(self.headers, stream, max_files=max_files,
                                                       max_fields=max_fields, max_part_size=max_part_size)
                        self._form = await parser.parse()
                except MultiPartException as exc:
                    raise HTTPException(status_code=400, detail=exc.message) from None
        return await super()._get_form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)


class StrictFormRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictFormRequest(request.scope, request.receive, request._send))

        return strict
