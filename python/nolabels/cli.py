"""The ``nolabels`` command line."""
from __future__ import annotations

import argparse
import json
import sys

from nolabels.errors import NolabelsError


def _cmd_info(args: argparse.Namespace) -> int:
    from nolabels.info import info, info_dict

    if args.json:
        print(json.dumps(info_dict(), indent=2))
    else:
        info()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nolabels", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="versions, devices, kernel library and backend status")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_info)
    from nolabels.commands import register_all

    register_all(sub)  # embed, label, eval, demo
    return p


# Errors a user can act on: ours (``nolabels.errors``: bad input, a foreign --out, missing
# weights or extras) and the OS's (a missing, unreadable or misplaced file or folder). One
# line on stderr and exit status 2, for every subcommand. Anything else is a bug of ours
# and keeps its traceback.
USER_ERRORS = (NolabelsError, OSError, UnicodeDecodeError)


def _describe(e: BaseException) -> str:
    """One line for a user error; OS errors name the file (``strerror: filename``)."""
    if isinstance(e, OSError) and not isinstance(e, NolabelsError) and e.strerror:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{where}: {e.strerror}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"nolabels {args.command}: error: {_describe(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
