"""The help of `dog` and `sheep` explains every argument: a user reads `--help`, not the
code."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from sheep.cli import dog, sheep_main


def _commands(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()
              ) -> Iterator[argparse.ArgumentParser]:
    """`parser` and every subcommand's parser under it (except the `skip` subtrees)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name not in skip:
                    yield from _commands(sub, skip)


ALL = [*_commands(dog.build_parser()), *_commands(sheep_main.build_parser())]


@pytest.mark.parametrize("parser", ALL, ids=[p.prog for p in ALL])
def test_every_positional_argument_has_help(parser: argparse.ArgumentParser) -> None:
    for action in parser._get_positional_actions():
        if not isinstance(action, argparse._SubParsersAction):
            assert action.help, f"{parser.prog}: {action.dest} has no help"


@pytest.mark.parametrize("parser", ALL, ids=[p.prog for p in ALL])
def test_every_option_with_a_default_shows_it(parser: argparse.ArgumentParser) -> None:
    for action in parser._get_optional_actions():
        if action.default in (None, False, "", argparse.SUPPRESS) or action.dest == "help":
            continue
        assert action.help, f"{parser.prog}: {action.option_strings} has no help"
        assert "default" in " ".join(parser._get_formatter()._expand_help(action).split()), (
            f"{parser.prog}: {action.option_strings} does not show its default")


def test_every_sheep_up_option_has_help() -> None:
    up = next(p for p in _commands(sheep_main.build_parser()) if p.prog == "sheep up")
    for action in up._actions:
        assert action.help, f"sheep up {action.option_strings} has no help"
