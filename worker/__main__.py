"""`python -m worker [--db URL] [--data-dir DIR]`: one worker process (what `quanttune serve`
starts N times; `quanttune worker` is the same for users)."""

from __future__ import annotations

import argparse
import logging

from .process import run_worker
from .settings import get_settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker")
    parser.add_argument("--db")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_worker(get_settings(db=args.db, data_dir=args.data_dir))


if __name__ == "__main__":
    main()
