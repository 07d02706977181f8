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
import typer.main
from typer._click.exceptions import ClickException, NoArgsIsHelpError

EXIT_USAGE = 2
_EXIT_INTERRUPTED = 130  # what typer returns, outside standalone mode, for Ctrl-C


class UserError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): library
    errors quoted inside one-line messages."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_seed(seed: int) -> None:
    """Seeds feed numpy's and torch's generators, which take 0 .. 2**63 - 1."""
    if not 0 <= seed < 2**63:
        fail(f"--seed must be a whole number from 0 to 2**63 - 1, got {seed}")


def error_line(message: str) -> None:
    """`error: <message>` on stderr in one write, so that the lines of several ranks sharing one
    stderr (torchrun) never interleave mid-line (print writes the text and the newline apart)."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _die(message: str) -> NoReturn:
    error_line(message)
    sys.exit(EXIT_USAGE)


# OSErrors about a path the user chose (an --out in a read-only folder or below a file, an
# unreadable input): one line naming the path, like a UserError
_PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)


def _command_options(app: typer.Typer) -> set[str]:
    """The option names (`--out`, `--resume`, ...) of the sub-command named in sys.argv, so a
    message suggests only options the failed command has (eval and report have no --resume)."""
    group = typer.main.get_command(app)
    name = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    command = getattr(group, "commands", {}).get(name)
    return {opt for param in (command.params if command else []) for opt in param.opts}


def _rerun(options: set[str]) -> str:
    return "rerun with --resume to continue" if "--resume" in options else "rerun the command"


def run_cli(app: typer.Typer) -> None:
    """Run a typer app; UserError, a full disk, an unusable path and Ctrl-C become one line and
    exit code 2."""
    try:
        # Not standalone: otherwise click turns Ctrl-C into its own "Aborted!" with exit 1.
        result = app(standalone_mode=False)
    except UserError as e:
        _die(str(e))
    except OSError as e:
        options = _command_options(app)
        other_out = " or choose another --out" if "--out" in options else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _die(f"the disk is full while writing {e.filename or 'the output'}; free space"
                 f"{other_out}, then {_rerun(options)}")
        if e.errno in _PATH_ERRNOS and e.filename is not None:
            _die(f"cannot use {e.filename}: {e.strerror}; check the path and its permissions"
                 f"{other_out}")
        raise
    except (KeyboardInterrupt, typer.Abort):
        _die(f"interrupted; {_rerun(_command_options(app))}")
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else e.format_message(), file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except ClickException as e:  # a bad flag or value: click's message, on one line
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        _die(e.format_message().replace("\n", " ") + hint)
    if result == _EXIT_INTERRUPTED:
        _die(f"interrupted; {_rerun(_command_options(app))}")
    if isinstance(result, int) and result != 0:  # typer.Exit(code) from a command
        sys.exit(result)
