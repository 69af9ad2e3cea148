"""User-facing errors and the CLI wrapper that turns them into one line and exit code 2."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A problem with the user's input (file, folder, config, checkpoint), not a bug.

    The message must be one line that names the file/key and the problem.
    """


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
            exit_with: Callable[[int], NoReturn] = sys.exit) -> NoReturn:
    """Run ``main(argv)`` and exit with its code (through ``exit_with``); a ``UserError`` prints
    ``error: <message>`` to stderr and exits 2, and so does an ``OSError`` the program did not
    handle (a full disk, a folder that became read-only during a write: one line naming the file;
    atomic writes leave earlier outputs intact)."""
    try:
        code = main(argv) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err} (nothing half-written was left behind)", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    exit_with(code)
