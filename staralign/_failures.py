"""Errors any command can meet that the user, not the code, must fix -- as one line.

``staralign.cli.main`` prints these without a traceback (set ``STARALIGN_DEBUG=1`` to see
one): a disk that is full, read-only or not writable (:class:`~staralign._io.WriteError`
and ``OSError`` with such an errno), a file the user may not read, an image that cannot be
read.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
from pathlib import Path

__all__ = ["user_message"]


def user_message(exc: BaseException) -> str | None:
    """One line for an error the user can fix, or None."""
    from ._io import WriteError, _write_failure
    from .data.images import ImageReadError

    if isinstance(exc, (WriteError, ImageReadError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
        # Reading or writing: the file and the reason say enough.
        return f"{exc.filename or 'a file'}: {exc.strerror or 'permission denied'}"
    if isinstance(exc, OSError):
        failure = _write_failure(Path(exc.filename or "."), exc)
        if failure is not None:
            return str(failure)
    return None
