"""The README: short enough to read in five minutes, and every option it shows is real.

Every `--option` or `-x` the README shows, in code blocks and in inline code, must be in the
`--help` of the mprnet command it is used with (`mprnet deblur ... --tile 512`), or, shown
on its own (`--max-pixels`), in the `--help` of some mprnet command. Commands of other
programs (`pip install -r ...`) are left alone. The documents in docs/ are held to the
first rule for the mprnet commands they show.
"""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mprnet_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_BYTES = 12_000  # what `wc -c README.md` counts
MAX_PICTURE_BYTES = 300_000

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FLAG = re.compile(r"^--?[A-Za-z][\w-]*$")
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
SEPARATORS = re.compile(r"\|\||&&|[|;]")


@cache
def _commands() -> dict[tuple[str, ...], str]:
    """Each mprnet command's path (`()` for mprnet itself, `("weights", "list")`) and its
    `--help`, wide enough not to wrap."""
    helps: dict[tuple[str, ...], str] = {}
    runner = CliRunner()

    def walk(command: object, path: tuple[str, ...]) -> None:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
        assert result.exit_code == 0, result.output
        helps[path] = result.stdout
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return helps


def _in_help(flag: str, help_text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def _segments(text: str) -> list[list[str]]:
    """The simple commands of a shell line (split at |, &&, ;), as words; comments dropped."""
    text = re.sub(r"(^|\s)#.*$", "", text.strip().removeprefix("$ "))
    segments = []
    for part in SEPARATORS.split(text):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        while words and ASSIGNMENT.match(words[0]):  # HF_HUB_OFFLINE=1 mprnet ...
            words.pop(0)
        segments.append([word for word in words if not word.startswith(">") and word != ">"])
    return segments


def _flags(words: list[str]) -> list[str]:
    """-r/--recursive and `-o, --output PATH` name two flags each; --tile=8 names --tile."""
    found = []
    for word in words:
        for piece in re.split(r"[/,]", word.split("=", 1)[0]):
            if FLAG.match(piece):
                found.append(piece)
    return found


def unknown_options(markdown: str, bare_flags: bool = True) -> list[str]:
    """What the text shows that mprnet's help does not have, in words; empty when all is
    well. With bare_flags, a flag shown on its own must be some command's."""
    commands = _commands()
    problems = []
    snippets = [line for language, block in FENCE.findall(markdown) if language != "python"
                for line in block.splitlines()]
    snippets += INLINE.findall(FENCE.sub("", markdown))
    for snippet in snippets:
        for words in _segments(snippet):
            if not words:
                continue
            if Path(words[0]).name == "mprnet":
                path: tuple[str, ...] = ()
                rest = words[1:]
                while rest and not rest[0].startswith("-") and (*path, rest[0]) in commands:
                    path, rest = (*path, rest[0]), rest[1:]
                if rest and not rest[0].startswith("-") and rest[0] != "..." and not path:
                    problems.append(f"{snippet!r}: no command `mprnet {rest[0]}`")
                    continue
                name = " ".join(("mprnet", *path))
                problems += [f"{snippet!r}: {flag} is not in `{name} --help`" for flag in _flags(rest)
                             if not _in_help(flag, commands[path])]
            elif bare_flags and FLAG.match(words[0].split("=", 1)[0].split("/")[0].rstrip(",")):
                problems += [f"{snippet!r}: {flag} is not in any mprnet command's --help" for flag in _flags(words)
                             if not any(_in_help(flag, text) for text in commands.values())]
    return problems


def test_readme_is_under_its_size_limit() -> None:
    assert README.stat().st_size < MAX_README_BYTES


def test_every_option_the_readme_shows_exists() -> None:
    assert unknown_options(README.read_text()) == []


@pytest.mark.parametrize("document", sorted(DOCS.glob("*.md")), ids=lambda path: path.name)
def test_every_option_a_document_shows_with_mprnet_exists(document: Path) -> None:
    assert unknown_options(document.read_text(), bare_flags=False) == []


def test_the_check_catches_made_up_options() -> None:
    """It can fail: a made-up flag, a real flag given to the wrong command, a made-up
    command, each in a code block and inline."""
    text = (
        "```console\n"
        "$ mprnet deblur photo.jpg --sharpen-more -o out.png\n"
        "$ cat a.png | mprnet weights list --tile 512 > x\n"
        "$ mprnet deblurr photo.jpg\n"
        "$ pip install --made-up-pip-flag -r requirements.txt\n"  # not ours: left alone
        "```\n"
        "Use `--turbo` or `-Z/--zap`, as in `mprnet denoise x.png --tile-blend split --bogus`.\n"
    )
    assert unknown_options(text) == [
        "'$ mprnet deblur photo.jpg --sharpen-more -o out.png': --sharpen-more is not in `mprnet deblur --help`",
        "'$ cat a.png | mprnet weights list --tile 512 > x': --tile is not in `mprnet weights list --help`",
        "'$ mprnet deblurr photo.jpg': no command `mprnet deblurr`",
        "'--turbo': --turbo is not in any mprnet command's --help",
        "'-Z/--zap': -Z is not in any mprnet command's --help",
        "'-Z/--zap': --zap is not in any mprnet command's --help",
        "'mprnet denoise x.png --tile-blend split --bogus': --bogus is not in `mprnet denoise --help`",
    ]


def _links(path: Path) -> list[str]:
    return [link for link in LINK.findall(path.read_text()) if "://" not in link]


@pytest.mark.parametrize("document", [README, *sorted(DOCS.glob("*.md"))], ids=lambda path: path.name)
def test_links_lead_somewhere(document: Path) -> None:
    for link in _links(document):
        assert (document.parent / link.split("#")[0]).exists(), link


def test_every_document_is_linked_from_the_readme() -> None:
    linked = {(ROOT / link.split("#")[0]).resolve() for link in _links(README)}
    assert sorted(path.name for path in DOCS.glob("*.md") if path.resolve() not in linked) == []


def test_the_picture_is_small() -> None:
    pictures = [ROOT / link for link in _links(README) if link.endswith(".png")]
    assert pictures and all(0 < picture.stat().st_size < MAX_PICTURE_BYTES for picture in pictures)
