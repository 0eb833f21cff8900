"""The one base class of errors a user can fix: bad settings, files, inputs, a full disk.

Every CLI (`mbert-train`, `mbert-prep`, `mbert-convert`, `mbert-plot`, `mbert-plan`) catches
`UserError` in exactly one place and prints its message, which is one line naming the setting
or file and the fix, with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re


class UserError(ValueError):
    """A problem the user can fix; `str(exc)` is one line naming the setting or file and the fix.

    A `ValueError` so that older `except ValueError` call sites keep catching it.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_os_error(exc: OSError, path: object, action: str = "writing") -> str:
    """One line for an OSError met while `action` `path`: disk full, read-only, permissions."""
    code = exc.errno
    if code == errno.ENOSPC or "No space left" in str(exc) or "file write failed" in str(exc):
        return f"no space left on the device while {action} {path}; free space or point it elsewhere"
    if code == errno.EROFS:
        return f"{path} is on a read-only file system; point it at a writable location"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied while {action} {path}; fix its permissions or point it elsewhere"
    if code == errno.EDQUOT:
        return f"disk quota exceeded while {action} {path}; free space or point it elsewhere"
    return f"{action} {path} failed: {first_line(exc)}"


def as_os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write; torch and safetensors report one only as text
    (torch: `[enforce fail at inline_container.cc:672] . unexpected pos` when the disk fills)."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    found = re.search(r"os error (\d+)", text)
    if found:
        return OSError(int(found.group(1)), text)
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        if os.strerror(code) in text:
            return OSError(code, text)
    if "unexpected pos" in text or "file write failed" in text:
        return OSError(errno.ENOSPC, text)
    if "inline_container.cc" in text:
        return OSError(errno.EIO, text)
    return None
