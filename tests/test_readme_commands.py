"""README's command table lists the CLI as registered: a row for every command (sub-commands such as
``models fetch`` included), no row for a command that does not exist, and every long option of a
command written in its row."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rscaffold_flows.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def command_table() -> dict[str, str]:
    """{command name ('' for the bare `rscaffold`): its usage cell} of the table under "## Commands"."""
    text = README.read_text()
    section = text[text.index("\n## Commands\n") :]
    start = section.index("| command | what it does |")
    rows = {}
    for line in section[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        usage = re.match(r"\| `rscaffold((?: [a-z][a-z-]*)*)(?: [^`]*)?` \|", line)
        assert usage, f"a row of README's command table does not start with a `rscaffold ...` usage: {line}"
        rows[usage.group(1).strip()] = line.split(" | ")[0]
    return rows


def registered() -> dict[str, list[str]]:
    """{command name: its long options} of the CLI, sub-commands by their full name."""
    out = {}

    def walk(cmd, prefix: list[str]) -> None:
        options = [o for p in cmd.params for o in p.opts if o.startswith("--")]
        if hasattr(cmd, "commands"):
            if options:
                out[" ".join(prefix)] = options
            for name, sub in cmd.commands.items():
                walk(sub, [*prefix, name])
        else:
            out[" ".join(prefix)] = options

    walk(typer.main.get_command(app), [])
    return out


def test_every_cli_command_has_a_row_and_every_row_a_command() -> None:
    table, cli = command_table(), registered()
    assert not set(cli) - set(table), (
        f"CLI commands missing from README's command table: {sorted(set(cli) - set(table))}"
    )
    assert not set(table) - set(cli), (
        f"README's command table lists commands the CLI lacks: {sorted(set(table) - set(cli))}"
    )


def test_every_option_of_a_command_is_in_its_row() -> None:
    table = command_table()
    missing = [
        f"{name or 'rscaffold'}: {option}"
        for name, options in registered().items()
        for option in options
        if name in table and not re.search(rf"{re.escape(option)}(?![\w-])", table[name])
    ]
    assert not missing, f"options missing from README's command table: {missing}"
