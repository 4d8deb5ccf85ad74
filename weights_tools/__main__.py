"""`python -m weights_tools COMMAND`: the offline tools that are not `edge` subcommands (make-model)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from edge.errors import EdgeError
    from weights_tools import make_model

    ap = argparse.ArgumentParser(prog="python -m weights_tools", description="Offline model tools.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    make_model.register(sub)
    args = ap.parse_args(argv)
    try:
        return args.handler(args)
    except EdgeError as exc:
        print(f"weights_tools: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("weights_tools: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
