"""The ``tokenmorph`` command line (also ``python -m tokenmorph``): registers the commands of
:mod:`tokenmorph.commands` and turns user errors into one line.

Only the command asked for builds its arguments (and imports what its help needs), so
``tokenmorph --help`` is instant. Every :class:`tokenmorph.errors.TokenmorphError` is printed as
``tokenmorph: error: <message>`` with exit status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .commands import COMMANDS, GROUPS
from .errors import TokenmorphError


def _module(name: str):
    return importlib.import_module(f"tokenmorph.commands.{name}")


def _selected(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """(first, second) positional words of ``argv``: the command, or a group and its command."""
    words = [a for a in argv if not a.startswith("-")][:2]
    return (words + [None, None])[0], (words + [None, None])[1]


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; the arguments of the command that ``argv`` selects are added, the others only
    listed."""
    p = argparse.ArgumentParser(
        prog="tokenmorph",
        description="Masked-image-modelling pre-training with Dynamic Token Morphing (DTM).",
    )
    p.add_argument("--version", action="version", version=f"tokenmorph {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    first, second = _selected(argv)
    groups: dict = {}
    for group, name, module in COMMANDS:
        if group is not None and group not in groups:
            g = sub.add_parser(group, help=GROUPS[group])
            groups[group] = g.add_subparsers(dest=f"{group}_command", metavar=group.upper())
            g.set_defaults(func=lambda a, _p=g: (_p.print_help(), 2)[1])
        parent = sub if group is None else groups[group]
        mod = _module(module)
        parser = parent.add_parser(
            name,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if (first, second if group else None) == ((group, name) if group else (name, None)):
            mod.add_arguments(parser)
            parser.set_defaults(func=mod.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    # KEY=VALUE overrides may sit anywhere among the flags (argparse alone takes them in one run)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "overrides", None) is not None:  # a training command: for its run history
        from .runtime.run_folder import set_command_line

        set_command_line(["tokenmorph", *argv])
    from .runtime.host import tune_host_allocator

    tune_host_allocator()  # every command: evaluation and benchmarks allocate as training does
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`: not an error
        sys.stderr.close()
        return 0
    except TokenmorphError as e:  # user-facing errors are one line; anything else is a bug
        return _fail(str(e))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" ({e.filename})" if e.filename else ""
        return _fail(f"no space left on device{where}: free some space and rerun the same command")


def _fail(message: str) -> int:
    """Print a user-facing error (on the main process only) and return exit status 2."""
    from .runtime.distributed import env_rank

    if env_rank() == 0:
        print(f"tokenmorph: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
