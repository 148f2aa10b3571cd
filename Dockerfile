# quanttune service image: the API (`quanttune serve --workers 0`) and workers (`quanttune worker`)
# run from the same image; docker-compose.yml wires them to PostgreSQL.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QUANTTUNE_DATA_DIR=/data

WORKDIR /app
# torch first, the CPU build, pinned as everywhere else (constraints.txt), so no dependency pulls another
COPY constraints.txt ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu -c constraints.txt torch
COPY . .
RUN pip install -c constraints.txt . \
    && useradd --create-home --uid 1000 quanttune \
    && mkdir -p /data && chown quanttune /data

USER quanttune
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v1/health', timeout=4)" || exit 1
CMD ["quanttune", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0", "--no-migrate"]
