"""The docs cannot drift from the code (issue 32): every `medseg ...` command line in a code block of README.md and
docs/*.md parses with the CLI's own argument parser, and every script path they name exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ENV = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")  # `MLFLOW_TRACKING_URI=... medseg ...`


def code_lines(path: Path):
    """(line number, command) of each shell line in the file's fenced code blocks, continuations joined."""
    inside, pending, start = False, "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        pending += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            yield start, pending.strip()
            pending = ""


def medseg_commands():
    for path in DOCS:
        for number, line in code_lines(path):
            for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
                command = ENV.sub("", part.split(" #")[0].strip())
                if command.startswith("medseg "):
                    yield pytest.param(command, id=f"{path.name}:{number}")


@pytest.mark.parametrize("command", list(medseg_commands()))
def test_every_documented_medseg_command_parses(command):
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as exc:
        pytest.fail(f"`{command}` does not parse (exit {exc.code})")


def test_every_documented_script_exists():
    named = set()
    for path in DOCS:
        named |= {(path.name, m) for m in re.findall(r"\b((?:benchmarks|stages|flows)/[\w/.-]+\.(?:py|sh))",
                                                        path.read_text(encoding="utf-8"))}
    missing = sorted(f"{doc}: {script}" for doc, script in named if not (ROOT / script).is_file())
    assert not missing, missing
    assert len(named) > 10  # the pattern still finds them


def test_the_docs_name_registered_models_where_the_cli_wants_them():
    """`medseg promote` takes a registered model's name (<prefix>-<dataset>-<arch>), never a bare architecture."""
    from medseg.models import available_models

    bare = [(cmd.id, cmd.values[0]) for cmd in medseg_commands()
            if cmd.values[0].startswith("medseg promote ") and shlex.split(cmd.values[0])[2] in available_models()]
    assert not bare, bare


def test_the_architecture_doc_lists_every_cli_command():
    import argparse

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("## CLI"):].split("\n## ")[0]
    listed = set(re.findall(r"`([a-z]+(?: [a-z]+)?)`", section))
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = set()
    for name, command in sub.choices.items():
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        commands |= {f"{name} {n}" for n in nested[0].choices} if nested else {name}
    assert commands <= listed, sorted(commands - listed)
