"""Hostile HTTP against the real server (uvicorn): oversized bodies are 413 whether announced or
streamed, oversized headers and URLs, bytes that are not UTF-8 and malformed requests get a 4xx;
the server stays up and nothing is stored."""

from __future__ import annotations

import json
import socket

import pytest

from tests.reliability.conftest import DIGITS, Served

pytestmark = pytest.mark.slow
LIMIT = 2_000_000  # QUANTTUNE_MAX_UPLOAD_BYTES of the `served` server


def raw_request(served: Served, request: bytes) -> bytes:
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_oversized_bodies_are_413_announced_or_streamed(served: Served) -> None:
    with served.client("bob") as bob:
        before = bob.get("/v1/jobs").json()["count"]
        spec = json.dumps({**DIGITS, "calibration": None})
        big = bob.post("/v1/jobs", files={"spec": (None, spec), "calibration_file": ("c.bin", b"\0" * (LIMIT + 1))})
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
        assert "QUANTTUNE_MAX_UPLOAD_BYTES" in big.json()["error"]["message"]

        def chunks():  # noqa: ANN202  (chunked transfer encoding: no Content-Length to refuse up front)
            yield b'--b\r\nContent-Disposition: form-data; name="spec"\r\n\r\n' + spec.encode() + b"\r\n"
            yield b'--b\r\nContent-Disposition: form-data; name="calibration_file"; filename="c.bin"\r\n\r\n'
            for _ in range(LIMIT // 65536 + 2):
                yield b"\1" * 65536
            yield b"\r\n--b--\r\n"

        streamed = bob.post("/v1/jobs", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
        assert bob.get("/v1/jobs").json()["count"] == before


def test_oversized_headers_urls_and_malformed_requests_are_4xx_and_the_server_stays_up(served: Served) -> None:
    token = served.tokens["bob"].encode()
    cases = {
        "a 100 kB header": b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        "a 100 kB URL": b"GET /v1/jobs/" + b"9" * 100_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a non-UTF-8 path": b"GET /v1/jobs/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer " + token + b"\r\n\r\n",
        "a non-UTF-8 query": b"GET /v1/jobs?status=\xff HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer " + token + b"\r\n\r\n",
        "a non-UTF-8 token": b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
        "a NUL in the path": b"GET /v1/jobs/\x00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
        "a bad Content-Length": b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: -5\r\n\r\n",
        "a lying Content-Length": b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
                                  + token + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 10"
                                  b"\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"spec\"\r\n\r\n{}\r\n--b--\r\n",
    }
    for case, request in cases.items():
        response = raw_request(served, request)
        assert response.startswith(b"HTTP/1.1 4"), (case, response[:300])
        assert 400 <= status_of(response) < 500, case
    with served.client("bob") as bob:
        assert bob.get("/v1/health").json()["status"] == "ok"
        assert bob.get("/v1/jobs").status_code == 200
