"""Errors users see: each names the file, key or component at fault and what was expected."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


class MiphaLabError(Exception):
    """Base class of every error mipha-lab raises on purpose."""

    exit_code = 2
    label = "error"


class ConfigError(MiphaLabError, ValueError):
    """A YAML file (card, experiment, profile) is malformed or does not match its schema."""


class UnknownNameError(MiphaLabError, KeyError):
    """A registry was asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class StorageError(MiphaLabError, OSError):
    """A write failed (a full disk, a quota, a file too large); finished work before it is kept."""


def _is_write_failure(err: BaseException) -> bool:
    return isinstance(err, OSError) or type(err).__name__ == "SafetensorError"  # safetensors' I/O errors


@contextlib.contextmanager
def disk_writes(what: str, advice: str) -> Iterator[None]:
    """A failed write (a full disk, a quota) becomes a StorageError saying what was being written and what
    to do; anything else passes through."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        if not _is_write_failure(err):
            raise
        reason = getattr(err, "strerror", None) or str(err)
        raise StorageError(f"{what} failed: {reason}; {advice}") from None


class InputError(MiphaLabError, ValueError):
    """Model inputs are inconsistent (image count, image size, sequence layout)."""


def exit_status(action: Callable[[], int]) -> int:
    """Run a command-line action; an error of ours becomes `error: ...` on stderr and exit status 2."""
    try:
        return action()
    except MiphaLabError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("stopped: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
