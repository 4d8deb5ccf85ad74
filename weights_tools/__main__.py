"""`python -m weights_tools COMMAND`: the offline tools that are not `edge` subcommands (make-model, moefy)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from edge.cli import run_handler
    from weights_tools import make_model, moefy

    ap = argparse.ArgumentParser(prog="python -m weights_tools", description="Offline model tools.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    make_model.register(sub)
    moefy.register(sub)
    args = ap.parse_args(argv)
    return run_handler("weights_tools", args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
