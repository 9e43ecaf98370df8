"""The ``pbcodec`` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pbcodec", description="Partially-binarized weight codec.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compress built-in synthetic layers and report size, accuracy and speed")
    d.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "demo":
            from .demo import run

            run(seed=args.seed)
        return 0
    except (ValueError, TypeError, OSError) as e:  # one clear line, non-zero status
        print(f"pbcodec: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
