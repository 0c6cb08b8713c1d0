"""Numbers and files that come from outside (options, config fields, table cells, user files).

Each is checked here, once, before anything is sized by it: a number must be finite and in range,
and a user file must be a regular file of bounded size before a byte of it is read, so that
``/dev/zero``, a FIFO or a multi-gigabyte file named by mistake is refused instead of exhausting
memory. The error class is a parameter because an architecture field fails as ``ArchError`` and a
table cell as ``LutError``; the message always names what was checked.
"""

from __future__ import annotations

import math
import numbers
import os
import stat
from pathlib import Path
from typing import BinaryIO

from amoeba_profile.core.errors import AmoebaError, UsageError

KIB, MIB = 1 << 10, 1 << 20


def _shown(value: object) -> str:
    """``repr`` of a value as the user wrote it: NumPy scalars as plain numbers (4.5, not np.float64(4.5))."""
    item = getattr(value, "item", None)
    if isinstance(value, numbers.Number) and callable(item):
        value = item()
    return repr(value)


def integer(
    value: object, what: str, *, minimum: int, maximum: int | None = None, error: type[AmoebaError] = UsageError
) -> int:
    """``value`` as an int in [minimum, maximum]; bools, floats and strings are refused."""
    number = int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None
    if number is None or number < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{what} must be {kind}, got {_shown(value)}")
    if maximum is not None and number > maximum:
        raise error(f"{what}={value} is above the maximum {maximum}")
    return number


def positive_int(value: object, what: str, *, maximum: int | None = None, error: type[AmoebaError] = UsageError) -> int:
    """``value`` as an int >= 1 (and <= ``maximum``): sizes, counts, lengths."""
    return integer(value, what, minimum=1, maximum=maximum, error=error)


def finite_float(
    value: object,
    what: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    error: type[AmoebaError] = UsageError,
) -> float:
    """``value`` as a finite float in [minimum, maximum]; bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise error(f"{what} must be a finite number, got {_shown(value)}")
    number = float(value)
    if minimum is not None and number < minimum:
        raise error(f"{what} must be >= {minimum:g}, got {_shown(value)}")
    if maximum is not None and number > maximum:
        raise error(f"{what}={_shown(value)} is above the maximum {maximum:g}")
    return number


def positive_float(
    value: object, what: str, *, maximum: float | None = None, error: type[AmoebaError] = UsageError
) -> float:
    """``value`` as a finite float > 0 (and <= ``maximum``): budgets, epsilons, frequencies."""
    number = finite_float(value, what, maximum=maximum, error=error)
    if number <= 0:
        raise error(f"{what} must be a positive number, got {_shown(value)}")
    return number


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n} bytes"


def open_regular(path: Path | str, what: str, error: type[AmoebaError] = UsageError) -> BinaryIO:
    """``path`` opened for reading in binary, once it is known to be a regular file.

    The one way a file that comes from outside (a user's, or one left in a cache or beside a table)
    is opened. The type comes from ``fstat`` of the opened descriptor, so a symlink is judged by
    what it points to, and the open does not block on a FIFO (``O_NONBLOCK``, which changes nothing
    for a regular file). For a file a library reads itself (weights); ``read_bounded`` for the rest."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path}: not a regular file; a {what} must be a file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(
    path: Path | str, limit_bytes: int, what: str, error: type[AmoebaError] = UsageError, *, head: bool = False
) -> bytes:
    """The bytes of a regular file of at most ``limit_bytes`` (``open_regular``); anything else is
    refused unread.

    The size comes from ``fstat`` too, and at most one byte more than the limit is read, so a file
    that grows after the check is refused as well. With ``head`` a larger file is not refused: its
    first ``limit_bytes`` are returned (a header line). Every failure, a lack of memory for the
    bytes included, is ``error`` naming the file: a caller never mistakes it for the device
    running out of memory."""
    path = Path(path)
    with open_regular(path, what, error) as handle:
        try:
            size = os.fstat(handle.fileno()).st_size
            if size > limit_bytes and not head:
                raise error(f"{path}: {size} bytes, over the {_size(limit_bytes)} limit for a {what}")
            data = handle.read(limit_bytes if head else limit_bytes + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read {what} ({exc.strerror})") from None
        except MemoryError:
            raise error(f"{path}: not enough memory to read this {what}") from None
    if len(data) > limit_bytes:
        raise error(f"{path}: grew past the {_size(limit_bytes)} limit for a {what} while being read")
    return data


def output_dir(path: Path | str, what: str) -> Path:
    """``path`` as a folder to write into, created with its parents if missing; a file in the way
    (or a folder that cannot be created) is a usage error naming the option."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{what} {path}: a file is in the way; name a folder") from None
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot create the folder ({exc.strerror})") from None
    return path
