"""`--help` reads like a person wrote it: values named, flags bare, options in panels,
examples last, short enough to take in at once. Through the real executable, as a user
sees it: on a terminal, on a pipe, and with NO_COLOR."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from mprnet_cli.cli import app, main

MPRNET = Path(sys.executable).parent / "mprnet"
TASKS = ("deblur", "derain", "denoise")
PANELS = ("Input and output", "Model", "Tiling", "Batch")
#: Panels that options of the other parts of the tool go into.
MORE_PANELS = ("Quality", "Video", "Scoring", "Cluster")
#: A task's help at 100 columns, from usage to examples: about one screen (72 lines since
#: the Cluster panel and --resume came).
LINE_BUDGET = 72
COLUMNS = 100
#: What Typer prints where a value has no name: types, not words.
PLACEHOLDERS = re.compile(r"<bool>|<str>|<int|<float|<path|list\[|\bTEXT\b|\bINTEGER\b|\bFLOAT\b|\bBOOLEAN\b|x>=|<=x")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _help_on_a_pipe(args: list[str], **env: str) -> str:
    finished = subprocess.run([str(MPRNET), *args, "--help"], capture_output=True, timeout=60,
                              env={**os.environ, "COLUMNS": str(COLUMNS), **env})
    assert finished.returncode == 0, finished.stderr
    return finished.stdout.decode()


def _help_on_a_terminal(args: list[str]) -> str:
    """On a pseudo-terminal, where Rich draws colours; they are taken out before reading."""
    leader, follower = pty.openpty()
    env = {key: value for key, value in os.environ.items() if key not in {"NO_COLOR", "TERM"}}
    process = subprocess.Popen([str(MPRNET), *args, "--help"], stdout=follower, stderr=follower,
                               env={**env, "COLUMNS": str(COLUMNS), "TERM": "xterm-256color"})
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower closed: Linux answers EIO
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=60) == 0
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    assert ANSI.search(text), "expected colours on a terminal"
    return ANSI.sub("", text)


HELP_OF = {
    "pipe": lambda args: _help_on_a_pipe(args),
    "no-color": lambda args: _help_on_a_pipe(args, NO_COLOR="1"),
    "terminal": _help_on_a_terminal,
}


def _command_paths() -> list[list[str]]:
    paths = []

    def walk(command: object, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


@pytest.mark.parametrize("how", sorted(HELP_OF))
@pytest.mark.parametrize("task", TASKS)
def test_task_help_fits_its_budget_at_100_columns(task: str, how: str) -> None:
    lines = HELP_OF[how]([task]).rstrip().splitlines()
    assert len(lines) <= LINE_BUDGET, "\n".join(lines)
    assert max(len(line) for line in lines) <= COLUMNS


@pytest.mark.parametrize("path", _command_paths(), ids=lambda path: " ".join(["mprnet", *path]))
def test_help_names_values_and_shows_no_types(path: list[str]) -> None:
    text = _help_on_a_pipe(path, NO_COLOR="1")
    assert PLACEHOLDERS.findall(text) == [], text


@pytest.mark.parametrize("task", TASKS)
def test_task_help_has_its_panels_in_order_and_examples_last(task: str) -> None:
    text = _help_on_a_pipe([task], NO_COLOR="1")
    titles = re.findall(r"^╭─ (.+?) ─", text, re.MULTILINE)
    assert titles[:2] == ["Arguments", "Options"]
    assert [title for title in titles if title in PANELS] == list(PANELS)
    assert set(titles) <= {"Arguments", "Options", *PANELS, *MORE_PANELS}
    after_panels = [line.strip() for line in text[text.rindex("╰"):].splitlines()[1:] if line.strip()]
    assert after_panels[0] == "Examples:"
    assert len(after_panels) >= 3 and all(f"mprnet {task} " in line for line in after_panels[1:])


def test_each_option_is_one_line_where_it_fits() -> None:
    """Most options take one line; none takes more than two."""
    for task in TASKS:
        rows = [line for line in _help_on_a_pipe([task], NO_COLOR="1").splitlines() if line.startswith("│ ")]
        starts = [index for index, row in enumerate(rows) if re.match(r"│ (-|\*)", row)]
        heights = [end - start for start, end in zip(starts, [*starts[1:], len(rows)])]
        assert len(starts) >= 17 and max(heights) <= 2 and heights.count(2) <= len(heights) // 3, rows


def test_every_option_names_its_value_and_sits_in_a_panel() -> None:
    """For the options added later too: a value has a name (not a type), a flag none, and
    each task option but --quiet and --help has its panel."""
    group = typer.main.get_command(app)
    for name in TASKS:
        for param in group.commands[name].params:
            if param.param_type_name != "option":
                continue
            if not param.is_flag:
                assert param.metavar, f"{name} {param.opts}: no metavar"
            if param.name not in {"quiet", "help"}:
                assert param.rich_help_panel in (*PANELS, *MORE_PANELS), f"{name} {param.opts}: no panel"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--quality", "0"], "for '--quality': 0: expected 1 to 100"),
        (["--quality", "101"], "for '--quality': 101: expected 1 to 100"),
        (["--tile-overlap", "-1"], "for '--tile-overlap': -1: expected 0 or more"),
        (["--max-pixels", "-1"], "for '--max-pixels': -1: expected 0 or more"),
    ],
)
def test_ranges_left_out_of_the_help_are_still_enforced(options: list[str], message: str,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["mprnet", "deblur", "photo.png", *options])
    with pytest.raises(SystemExit) as exit_status:
        main()
    assert exit_status.value.code == 2
    assert capsys.readouterr() == ("", f"error: Invalid value {message} (see `mprnet deblur --help`)\n")
