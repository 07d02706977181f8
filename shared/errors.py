"""User-facing errors: one clear line, exit code 2, no traceback.

Anything a user can cause (a bad flag, a missing file, a store from another model) raises
`UserError` at the edge; the CLIs catch it in `run_cli` and print `error: <message>`.
Internal invariants stay plain asserts.
"""

from __future__ import annotations

import errno
import sys
from typing import NoReturn

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError

EXIT_USAGE = 2
_EXIT_INTERRUPTED = 130  # what typer returns, outside standalone mode, for Ctrl-C


class UserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def _die(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run_cli(app: typer.Typer) -> None:
    """Run a typer app; UserError, a full disk and Ctrl-C become one line and exit code 2."""
    try:
        # Not standalone: otherwise click turns Ctrl-C into its own "Aborted!" with exit 1.
        result = app(standalone_mode=False)
    except UserError as e:
        _die(str(e))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _die(
                f"the disk is full while writing {e.filename or 'the output'}; free space or "
                "choose another --out, then rerun with --resume"
            )
        raise
    except (KeyboardInterrupt, typer.Abort):
        _die("interrupted; rerun with --resume to continue")
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else e.format_message(), file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except ClickException as e:  # a bad flag or value: click's message, on one line
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        _die(e.format_message().replace("\n", " ") + hint)
    if result == _EXIT_INTERRUPTED:
        _die("interrupted; rerun with --resume to continue")
    if isinstance(result, int) and result != 0:  # typer.Exit(code) from a command
        sys.exit(result)
