"""What libraries print or warn while a file is read: one line of ours, naming the file."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings

import pytest

from mprnet_cli import library_messages


def _warn(*messages: str) -> None:
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=1)


@pytest.fixture
def hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warning hook, as the CLI installs it, without touching this process's descriptor 2."""
    monkeypatch.setattr(library_messages, "_fallback_showwarning", warnings.showwarning)
    monkeypatch.setattr(warnings, "showwarning", library_messages._show_warning)
    warnings.simplefilter("always")


def test_warnings_inside_become_one_line_naming_the_file(hooked: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mprnet")
    with library_messages.collect("scan.tif"):
        _warn("Tag data larger than file", "Possibly corrupt EXIF data", "third")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "scan.tif: Tag data larger than file (and 2 more messages; MPRNET_DEBUG=1 shows them)")]


def test_one_message_has_no_count(hooked: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mprnet")
    with library_messages.collect("a.png"):
        _warn("only this")
    assert [r.getMessage() for r in caplog.records] == ["a.png: only this"]


def test_debug_shows_every_message(hooked: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mprnet")
    with library_messages.collect("a.png"):
        _warn("first", "second")
    assert [r.getMessage() for r in caplog.records] == ["a.png: first", "a.png: second"]


def test_a_failed_read_leaves_its_error_to_speak(hooked: None, caplog: pytest.LogCaptureFixture) -> None:
    for level, expected in ((logging.INFO, []), (logging.DEBUG, [(logging.DEBUG, "a.png: noise before the failure")])):
        caplog.clear()
        caplog.set_level(level, logger="mprnet")
        with pytest.raises(ValueError, match="damaged"), library_messages.collect("a.png"):
            _warn("noise before the failure")
            raise ValueError("damaged")
        assert [(r.levelno, r.getMessage()) for r in caplog.records] == expected


def test_nested_blocks_report_once_under_the_outer_name(hooked: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mprnet")
    with library_messages.collect("outer.tif"):
        with library_messages.collect("inner"):
            _warn("from inside")
        _warn("from outside")
    assert [r.getMessage() for r in caplog.records] == ["outer.tif: from inside (and 1 more message; MPRNET_DEBUG=1 shows them)"]


def test_warnings_outside_a_block_go_where_they_went(hooked: None, caplog: pytest.LogCaptureFixture) -> None:
    seen = []
    library_messages._fallback_showwarning = lambda message, *rest: seen.append(str(message))
    _warn("not a decoder's")
    assert seen == ["not a decoder's"] and caplog.records == []


def test_c_output_on_descriptor_2_is_caught_and_ours_is_not() -> None:
    """In a real process: C code writes to descriptor 2 directly, as libtiff does."""
    script = textwrap.dedent("""
        import logging, os, sys
        from mprnet_cli import library_messages
        logger = logging.getLogger("mprnet")
        library_messages.install()
        logger.addHandler(logging.StreamHandler(sys.stderr))
        logger.setLevel(logging.INFO)
        with library_messages.collect("a.tif"):
            os.write(2, b"TIFFFetchNormalTag: Incorrect count\\n_tiffReadProc: Invalid Read\\n")
            print("ours, during the capture", file=sys.stderr)
        os.write(2, b"after\\n")
    """)
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert finished.stderr.decode().splitlines() == [
        "ours, during the capture",
        "a.tif: TIFFFetchNormalTag: Incorrect count (and 1 more message; MPRNET_DEBUG=1 shows them)",
        "after",
    ]
