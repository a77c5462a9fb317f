"""The commands shown in README.md and docs/*.md, read from their fenced code blocks.

A command is a line of a fenced block (any info string but yaml/json/python/text/toml) whose first
word, after an optional ``$ `` prompt, ``VAR=value`` assignments and ``time``, is one of the
project's entry points (`launch`, `data-prep`, `scripts/...`, `benchmarks/...`, `python ...`).
In a block that uses ``$ `` prompts only the prompted lines are commands (the rest is output).
Trailing ``# comments`` are dropped; a line ending in ``\\`` continues on the next. Blocks meant as
syntax rather than something to run (``RUN_DIR``, ``[--option]``) are marked ``text``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
NOT_COMMANDS = {"yaml", "yml", "json", "python", "text", "toml", "ini"}
ENTRY_POINTS = ("launch", "data-prep", "python", "python3", "rm", "wandb")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


@dataclass(frozen=True)
class Command:
    document: str
    line: int
    text: str
    """The command exactly as the document shows it, comment and prompt removed."""
    output: tuple[str, ...] = ()
    """Lines the document shows as its output (console blocks)."""


def _strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` outside quotes, after whitespace)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def _is_command(text: str) -> bool:
    try:
        words = shlex.split(text)
    except ValueError:
        return False
    while words and (re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]) or words[0] in ("time", "/usr/bin/time")):
        words = words[1:]
        while words and words[0].startswith("-"):  # /usr/bin/time's options: -v, -f FORMAT
            words = words[2:] if words[0] in ("-f", "-o") else words[1:]
    if not words:
        return False
    first = words[0]
    return first in ENTRY_POINTS or first.startswith(("scripts/", "benchmarks/"))


def commands_in(document: str) -> list[Command]:
    lines = (REPO / document).read_text().splitlines()
    found: list[Command] = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        language = match.group(2).lower()
        end = index + 1
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        block = lines[index + 1:end]
        if language not in NOT_COMMANDS:
            found.extend(_block_commands(document, index + 2, block))
        index = end + 1
    return found


def _block_commands(document: str, first_line: int, block: list[str]) -> list[Command]:
    prompted = any(line.lstrip().startswith("$ ") for line in block)
    commands: list[Command] = []
    pending: list[str] = []
    start = 0
    output: list[str] = []
    for offset, raw in enumerate(block):
        line = raw.strip()
        if pending:
            line = _strip_comment(line)
            pending.append(line.rstrip("\\").strip())
            if not line.endswith("\\"):
                commands.append(Command(document, start, " ".join(pending)))
                pending = []
            continue
        if prompted and not line.startswith("$ "):
            if commands and line:
                output.append(line)
                commands[-1] = Command(commands[-1].document, commands[-1].line, commands[-1].text, tuple(output))
            continue
        if prompted:
            line = line[2:]
            output = []
        text = _strip_comment(line)
        if not _is_command(text.rstrip("\\").strip()):
            continue
        if text.endswith("\\"):
            pending, start = [text.rstrip("\\").strip()], first_line + offset
            continue
        commands.append(Command(document, first_line + offset, text))
    return commands


def all_commands() -> list[Command]:
    return [command for document in DOCUMENTS for command in commands_in(document)]


if __name__ == "__main__":
    for command in all_commands():
        print(f"{command.document}:{command.line}: {command.text}")
        for line in command.output:
            print(f"      | {line}")
