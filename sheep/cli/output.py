"""What `dog` and `sheep` print, in one place: the --json convention, one-line errors (JSON
ones under --json), a quiet exit on a closed stdout, and help that shows defaults.

The --json convention (the README states it): every integer is a JSON number (sizes and
counts in bytes or objects, never strings, even 64-bit ones); every time is a number of
seconds since the Unix epoch (0: never); every field is present, with its zero value when
unset; an error is `{"error": MESSAGE, "code": CODE}` on stderr with a non-zero exit.
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import sys
from importlib.metadata import PackageNotFoundError, version

import grpc

from sheep.errors import SheepError
from sheep.output import to_devnull


def message_dict(message) -> dict:
    """A protobuf message as data under the convention. MessageToDict would turn 64-bit
    integers into strings (proto3's JSON mapping), so the fields are walked here."""
    out: dict = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            value = ([message_dict(v) for v in value] if field.is_repeated
                     else message_dict(value))
        elif field.is_repeated:
            value = list(value)
        out[field.name] = value
    return out


def emit(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def package_version() -> str:
    try:
        return version("sheep")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version",
                        version=f"{parser.prog} {package_version()}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless the help already says it or there
    is nothing to show (None, a flag's False, an empty string)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands (made with its own class) all use HelpFormatter,
    and whose errors on a command line with --json are JSON too."""

    _json = False

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # each subcommand's parser is called with the words left for it, --json among them
        self._json = "--json" in (sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        if not self._json:
            super().error(message)
        report_error(self.prog, message, "usage", as_json=True)
        sys.exit(2)


def stdout_closed() -> bool:
    """Whether the reader of our stdout went away: poll reports POLLERR on the write end
    of a pipe whose read end is closed."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError):
        return False


def quiet_broken_pipe() -> int:
    """Exit as coreutils do when `| head` stops reading: no message, status 128+SIGPIPE.
    stdout is pointed at /dev/null first, or the interpreter's last flush would print an
    'Exception ignored' traceback."""
    to_devnull(sys.stdout.fileno())
    return 141


def os_error_line(exc: OSError) -> str:
    """`PATH: reason` (or the reason alone): the path the user gave, not a Python repr."""
    reason = exc.strerror or str(exc)
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return ": ".join([*names, reason]) if names else reason


def error_code(exc: BaseException) -> str:
    """A stable, machine-readable name for the failure (the `code` of a JSON error)."""
    if isinstance(exc, SheepError):
        return exc.code.name.lower()
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return "unreachable"
        return exc.code().name.lower()
    if isinstance(exc, OSError):
        return errno.errorcode.get(exc.errno or 0, "os_error").lower()
    return "usage"


def report_error(prog: str, message: str, code: str, as_json: bool) -> int:
    """Print one error line on stderr (a JSON object under --json); the exit status."""
    if as_json:
        print(json.dumps({"error": message, "code": code}), file=sys.stderr)
    else:
        print(f"{prog}: {message}", file=sys.stderr)
    return 1
