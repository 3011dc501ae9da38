"""What the imaging libraries say while they read or write a file, as one line naming it.

libtiff, libpng (inside OpenCV) and friends print straight onto file descriptor 2, with no
file name, and Pillow speaks through Python's warnings. In a batch of thousands of files
that buries the lines that matter. Around each decode, encode and sniff, `collect(label)`
catches both and logs at most one `LABEL: first message (and N more)` warning; with the
`mprnet` logger at DEBUG (MPRNET_DEBUG=1) every message is logged.

Descriptor 2 belongs to the whole process, so it is taken over only after `install()`
(the CLI calls it), which first moves Python's own `sys.stderr` onto a duplicate of it:
our lines and progress bars then never land in a capture. Captures take turns (one lock),
and a message printed by another thread during one is counted against that file. Without
`install()` (the Python API), only Python warnings are collected.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

logger = logging.getLogger("mprnet")

_turn = threading.RLock()
_local = threading.local()
#: Where descriptor 2 points during a capture; None until `install()`.
_capture: IO[bytes] | None = None
_fallback_showwarning: Any = None


def install(capture_descriptor: bool = True) -> None:
    """Route the C libraries' stderr (unless `capture_descriptor` is False) and Pillow's
    warnings through `collect` for this process.

    Idempotent for the descriptor; the warning hook is put back in place on every call,
    since test runners restore `warnings.showwarning` between tests.
    """
    global _capture, _fallback_showwarning
    if _capture is None and capture_descriptor:
        _move_python_stderr_off_descriptor_2()
        _capture = tempfile.TemporaryFile()
        atexit.register(_capture.close)
    if warnings.showwarning is not _show_warning:
        _fallback_showwarning = warnings.showwarning
        warnings.showwarning = _show_warning
    # Every occurrence, not the first per code location: each file gets its own messages.
    warnings.filterwarnings("always", module=r"PIL(\.|$)")


def _move_python_stderr_off_descriptor_2() -> None:
    try:
        on_descriptor_2 = sys.stderr is not None and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a test runner's stream, say
        on_descriptor_2 = False
    if not on_descriptor_2:
        return  # Python does not write to descriptor 2: capturing it cannot swallow our lines
    sys.stderr.flush()
    sys.stderr = open(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding,  # noqa: SIM115
                      errors=sys.stderr.errors)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    collected = getattr(_local, "messages", None)
    if collected is None:
        _fallback_showwarning(message, category, filename, lineno, file, line)
        return
    from PIL import Image

    if not issubclass(category, Image.DecompressionBombWarning):  # our own pixel limit speaks for it
        collected.append(str(message))


@contextmanager
def collect(label: str) -> Iterator[None]:
    """Catch what libraries print and warn inside the block; log it as `label`'s, in one
    line. If the block raises, its error is the message: what was caught goes to DEBUG."""
    if getattr(_local, "messages", None) is not None:  # nested: the outer block reports
        yield
        return
    messages: list[str] = []
    failed = False
    with _turn:
        _local.messages = messages
        saved = _redirect()
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            messages.extend(_restore(saved))
            _local.messages = None
            _report(label, messages, failed)


def _redirect() -> int | None:
    if _capture is None:
        return None
    saved = os.dup(2)
    _capture.seek(0)
    _capture.truncate()
    os.dup2(_capture.fileno(), 2)
    return saved


def _restore(saved: int | None) -> list[str]:
    if saved is None or _capture is None:
        return []
    os.dup2(saved, 2)
    os.close(saved)
    _capture.seek(0)
    text = _capture.read().decode("utf-8", "backslashreplace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _report(label: str, messages: list[str], failed: bool) -> None:
    messages = list(dict.fromkeys(messages))  # libraries repeat themselves, per tag or per strip
    if not messages:
        return
    if failed or logger.isEnabledFor(logging.DEBUG):
        level = logging.DEBUG if failed else logging.WARNING
        for message in messages:
            logger.log(level, "%s: %s", label, message)
        return
    more = len(messages) - 1
    logger.warning("%s: %s%s", label, messages[0],
                   f" (and {more} more message{'s' if more > 1 else ''}; MPRNET_DEBUG=1 shows them)" if more else "")


@contextmanager
def silenced() -> Iterator[None]:
    """Drop what is printed on descriptor 2 during the block: for a library that reports on
    its own what our lines already say (Ray's workers and scheduler). A no-op without
    `install()`, or with MPRNET_DEBUG=1, which leaves descriptor 2 alone."""
    if _capture is None:
        yield
        return
    saved = os.dup(2)
    with open(os.devnull, "wb") as nowhere:
        os.dup2(nowhere.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

