"""Bring the local no-Docker stack up, report it, or tear it down.

python -m stack up        # start (or reuse) Kafka, PostgreSQL, MongoDB protocol, Prefect
python -m stack status    # what answers, where, which versions
python -m stack down      # stop everything it started (data kept)
python -m stack down --purge   # ... and delete $TAPELINE_HOME's data
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from stack.process import StackError
from stack.services import ORDER, services, up
from tasks.core import config
from tasks.core.topics import ensure_topics


def _status(items) -> int:
    bad = 0
    for s in items:
        ok = s.answers()
        bad += not ok
        detail = ""
        if ok:
            try:
                detail = s.version()
            except Exception as e:  # version is informative only
                detail = f"(version unknown: {e})"
        print(f"{s.name:9} {'up  ' if ok else 'DOWN'}  {s.where():45} {detail}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "--only", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}"
    )
    parser.add_argument("--purge", action="store_true", help="with down: delete data too")
    args = parser.parse_args(argv)
    settings = config.load()
    names = tuple(n for n in args.only.split(",") if n)
    unknown = set(names) - set(ORDER)
    if unknown:
        parser.error(f"unknown services: {', '.join(sorted(unknown))}")
    items = services(settings, names)

    if args.command == "down":
        for s in reversed(items):
            print(f"{s.name:9} {'stopped' if s.down() else 'not running'}")
        if args.purge:
            shutil.rmtree(settings.home, ignore_errors=True)
            print(f"removed {settings.home}")
        return 0
    if args.command == "status":
        return _status(items)

    t0 = time.monotonic()
    try:
        states = up(items)
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, state in states.items():
        print(f"{name:9} {state}")
    if "kafka" in names:
        for topic, state in ensure_topics(settings).items():
            print(f"topic     {state:8} {topic}")
    print(f"stack ready in {time.monotonic() - t0:.1f}s; data and logs in {settings.home}")
    return _status(items)


if __name__ == "__main__":
    sys.exit(main())
