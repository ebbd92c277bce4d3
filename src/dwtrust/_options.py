"""
Command-line conventions shared by C{dwtrust} and C{twistd dwtrust}:
GNU-style option order, usage lines that name the program, option names in
every bad-value message, C{--version}, and one-line usage errors.
"""

from __future__ import annotations

import getopt
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from twisted.python import usage

from ._version import __version__

#: The exit status of a usage error, as for getopt-based tools.
USAGE = 2


class _NamedCoercion(usage.CoerceParameter):
    """
    A coerced parameter whose errors name the option and say what it takes.
    """

    def __init__(self, stock: usage.CoerceParameter) -> None:
        super().__init__(stock.options, stock.coerce)  # type: ignore[no-untyped-call]
        self.doc = stock.doc

    def dispatch(self, parameterName: str, value: str | None) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            coerced = self.coerce(value)
        except (ValueError, OverflowError) as e:
            wanted = _COERCE_NAMES.get(self.coerce, "")
            detail = f" ({wanted})" if wanted else f": {e}"
            raise usage.UsageError(
                f"--{parameterName}: invalid value {value!r}{detail}"
            ) from None
        self.options.opts[parameterName] = coerced


_COERCE_NAMES: dict[Callable[..., Any], str] = {
    int: "a whole number",
    float: "a number",
}


def positive(value: str) -> float:
    """
    A positive number (of seconds, as most are): C{coerce} for an option.
    """
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf"):
        raise ValueError(f"{value} is not a positive number of seconds")
    return number


positive.coerceDoc = "A positive number of seconds."  # type: ignore[attr-defined]


def seconds(value: str) -> float:
    """
    A number of seconds, 0 or more: C{coerce} for an option.
    """
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 <= number < float("inf"):
        raise ValueError(f"{value} is not a number of seconds, 0 or more")
    return number


seconds.coerceDoc = "A number of seconds, 0 or more."  # type: ignore[attr-defined]


def count(value: str) -> int:
    """
    A positive whole number: C{coerce} for an option.
    """
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{value} is not a positive whole number")
    return number


count.coerceDoc = "A positive whole number."  # type: ignore[attr-defined]


class GNUOptions(usage.Options):
    """
    L{usage.Options} with options and arguments in any order (C{--} ends the
    options), as C{getopt.gnu_getopt} parses them; a command with
    subcommands still stops at the subcommand's name.

    Subclasses name their program in L{programName}; a subcommand's name is
    its parent's and its own (C{dwtrust approve}).
    """

    #: The program, as its usage line and its errors name it.
    programName = "dwtrust"

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        # Help from docstrings keeps their line breaks and indentation,
        # which the help's own wrapping would print as runs of spaces.
        self.docs = {
            name: " ".join(doc.split()) if isinstance(doc, str) else doc
            for name, doc in self.docs.items()
        }

    def commandName(self) -> str:
        """
        The command as typed: C{dwtrust}, C{dwtrust approve}, C{twistd
        dwtrust}.
        """
        parent = getattr(self, "parent", None)
        if isinstance(parent, GNUOptions) and parent.subCommand:
            return f"{parent.commandName()} {parent.subCommand}"
        return self.programName

    def getSynopsis(self) -> str:
        default = "[options]" if self.longOpt else ""
        synopsis = str(getattr(self, "synopsis", default)).strip()
        return f"Usage: {self.commandName()} {synopsis}".rstrip()

    def opt_version(self) -> None:
        """
        Display dwtrust's version and exit.
        """
        print(f"dwtrust {__version__}")
        sys.exit(0)

    def _reorder(self, arguments: Sequence[str]) -> list[str]:
        """
        C{arguments} with every option before every other argument, each
        option's value attached, and C{--} between them.
        """
        try:
            found, rest = getopt.gnu_getopt(
                list(arguments), self.shortOpt, self.longOpt
            )
        except getopt.GetoptError as e:
            raise usage.UsageError(_getoptMessage(e)) from None
        ordered: list[str] = []
        for name, value in found:
            if name.startswith("--"):
                ordered.append(
                    f"{name}={value}" if name[2:] + "=" in self.longOpt else name
                )
            else:
                ordered.append(name)
                if name[1] + ":" in self.shortOpt:
                    ordered.append(value)
        return [*ordered, "--", *rest]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        arguments = list(sys.argv[1:] if options is None else options)
        for name, handler in list(self._dispatch.items()):
            if type(handler) is usage.CoerceParameter:
                self._dispatch[name] = _NamedCoercion(handler)
        try:
            # Twisted's shell completion passes its own option last.
            completing = "--_shell-completion" in arguments[-2:]
            if not getattr(self, "subCommands", None) and not completing:
                arguments = self._reorder(arguments)
            super().parseOptions(arguments)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            parent = getattr(self, "parent", None)
            if parent is not None and not isinstance(parent, GNUOptions):
                # A plugin of another program (twistd), which would print
                # the whole help and exit 1: one line, and the usage status.
                raise exitForUsage(self, e) from None
            # The innermost command's options, for the message and the hint.
            if getattr(e, "options", None) is None:
                e.options = self  # type: ignore[attr-defined]
            text = str(e.args[0]) if e.args else ""
            if text == "Wrong number of arguments.":
                e.args = ("wrong number of arguments",)
            elif text.startswith("Unknown command: "):
                e.args = (f"unknown command {text[len('Unknown command: ') :]!r}",)
            raise


def _getoptMessage(error: getopt.GetoptError) -> str:
    """
    getopt's complaint, in our words.
    """
    option = f"-{error.opt}" if len(error.opt) == 1 else f"--{error.opt}"
    text = str(error.msg)
    if "not recognized" in text:
        return f"unknown option {option}"
    if "requires argument" in text:
        return f"{option} needs a value"
    if "must not have an argument" in text:
        return f"{option} takes no value"
    if "not a unique prefix" in text:
        return f"{option} is ambiguous (not a unique prefix)"
    return text


def reportUsageError(error: usage.UsageError, fallback: GNUOptions, err: TextIO) -> int:
    """
    Write a usage error as one line, with a hint where the help is, and
    return the usage status.
    """
    options = getattr(error, "options", None)
    err.write(_oneLine(options if isinstance(options, GNUOptions) else fallback, error))
    return USAGE


class UsageExit(SystemExit):
    """
    The end of a program for a usage error, with the usage status; its text
    is the error's line, already written to standard error.
    """

    def __init__(self, message: str) -> None:
        super().__init__(USAGE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def exitForUsage(options: GNUOptions, error: Exception) -> UsageExit:
    """
    Write C{error}'s line and hint to standard error; the L{UsageExit} to
    raise.
    """
    line = _oneLine(options, error)
    sys.stderr.write(line)
    return UsageExit(line.splitlines()[0])


def _oneLine(options: GNUOptions, error: Exception) -> str:
    """
    A usage error's line, and the hint where the help is.
    """
    name = options.commandName()
    message = " ".join(str(error).split()) or "bad usage"
    return f"{name}: error: {message}\nTry '{name} --help'.\n"
