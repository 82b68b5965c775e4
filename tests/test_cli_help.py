"""``--help`` of every ``dispatch`` command: every argument explained, every default shown.

Walks the real parser (the core commands, those of other rooms and of installed plugins such as
the load-test kit), so a new argument without a help text fails here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from dispatch.cli.main import build_parser, main


def _parsers(parser: argparse.ArgumentParser, path: str = "dispatch") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def _subcommand_helps(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str | None]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield choice.dest, choice.help


PARSERS = list(_parsers(build_parser()))


def test_the_walk_sees_every_room_and_plugin() -> None:
    names = {path for path, _ in PARSERS}
    for expected in ("dispatch worker", "dispatch plan", "dispatch serve", "dispatch suppress add", "dispatch demo"):
        assert expected in names


@pytest.mark.parametrize(("path", "parser"), PARSERS, ids=[path for path, _ in PARSERS])
def test_every_argument_and_command_has_help(path: str, parser: argparse.ArgumentParser) -> None:
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]
    assert not missing, f"{path}: arguments without a help text: {missing}"
    undescribed = [name for name, text in _subcommand_helps(parser) if not (text or "").strip()]
    assert not undescribed, f"{path}: subcommands without a help text: {undescribed}"


@pytest.mark.parametrize(("path", "parser"), PARSERS, ids=[path for path, _ in PARSERS])
def test_help_shows_every_default(path: str, parser: argparse.ArgumentParser) -> None:
    shown = " ".join(parser.format_help().split())  # argparse wraps lines
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or isinstance(default, bool) or default == argparse.SUPPRESS:
            continue
        assert f"(default: {default})" in shown, f"{path} {action.option_strings}: default {default!r} not shown"


def test_help_output_through_the_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["callbacks", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "port to listen on (default: 8098)" in out and "address to listen on (default: 127.0.0.1)" in out
