"""How both command lines describe themselves: --help with examples, and shell completion.

Both read the argparse tree at run time, so neither can go stale: a new command, option or choice
is in the help and the completion the moment it is in the parser. The module lives in ``agent/``
because the collector may import agent code but the agent never imports the collector's; it
imports nothing but the standard library, so ``zonewatch-agent`` stays light.

The completion scripts hold the tree as shell ``case`` tables (node -> words) and one small
function that walks the words typed so far to find the node, skipping options and their values.
A node is the command path below the program: "" (the program itself), "incidents",
"incidents list".
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

SHELLS = ("bash", "zsh")
FILES = "@files"  # in a value list: offer file names instead


class ExamplesHelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal, text laid out in lines (the examples) kept as written.

    argparse's default formatter joins an epilog's lines into one paragraph, and its raw one
    leaves a one-line description as one long line: a description is one paragraph, examples are
    lines, so text with a line break in it is kept and any other is wrapped.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip("\n"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def examples(prog: str, *lines: str) -> str:
    """An examples epilog: one command line per line, each after ``prog``."""
    return "examples:\n" + "".join(f"  {prog} {line}\n" for line in lines)


class Node(NamedTuple):
    """One command of the tree and what may be typed after it."""

    path: str  # "" for the program, "incidents list" for a subcommand
    commands: tuple[str, ...]  # its subcommands
    options: tuple[str, ...]  # every option string, flags and those taking a value
    values: dict[str, tuple[str, ...]]  # option taking a value -> its choices, (FILES,) or ()
    positional: tuple[str, ...]  # what its positional arguments may be: choices, (FILES,) or ()


def tree(parser: argparse.ArgumentParser) -> list[Node]:
    """Every command of the parser, the program first, then depth first in definition order."""
    return list(_walk(parser, ""))


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[Node]:
    commands: dict[str, argparse.ArgumentParser] = {}
    options: list[str] = []
    values: dict[str, tuple[str, ...]] = {}
    positional: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
        elif action.help == argparse.SUPPRESS:
            continue
        elif action.option_strings:
            options += action.option_strings
            if action.nargs != 0:
                for option in action.option_strings:
                    values[option] = _values(action)
        else:
            positional += [v for v in _values(action) if v not in positional]
    yield Node(path, tuple(commands), tuple(options), values, tuple(positional))
    for name, child in commands.items():
        yield from _walk(child, f"{path} {name}".strip())


def _values(action: argparse.Action) -> tuple[str, ...]:
    if action.choices is not None and not isinstance(action.choices, dict):
        return tuple(str(choice) for choice in action.choices)
    if action.type is Path or isinstance(action.type, argparse.FileType):
        return (FILES,)
    return ()


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``parser.prog`` in ``shell`` (bash or zsh)."""
    if shell not in SHELLS:
        raise ValueError(f"no completion for {shell!r}: use {' or '.join(SHELLS)}")
    prog = parser.prog
    name = re.sub(r"\W", "_", prog)
    nodes = tree(parser)
    tables = "\n".join(
        [
            _table(f"_{name}_commands", {n.path: n.commands for n in nodes}),
            _table(f"_{name}_options", {n.path: n.options for n in nodes}),
            _table(f"_{name}_valued", {n.path: tuple(n.values) for n in nodes}),
            _table(f"_{name}_values", {f"{n.path}|{o}": v for n in nodes for o, v in n.values.items()}),
            _table(f"_{name}_positional", {n.path: n.positional for n in nodes}),
        ]
    )
    template = _BASH if shell == "bash" else _ZSH
    return template.replace("@PROG@", prog).replace("@NAME@", name).replace("@TABLES@", tables)


def _table(function: str, rows: dict[str, tuple[str, ...]]) -> str:
    """A shell function printing the words of its argument's row (both shells read this)."""
    cases = "".join(
        f"        {_quote(key)}) echo {_quote(' '.join(words))} ;;\n" for key, words in rows.items() if words
    )
    return f'{function}() {{\n    case "$1" in\n{cases}    esac\n}}\n'


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


_HEADER = """\
# @SHELL@ completion for @PROG@, generated from its argument parser by
# `@PROG@ completion @SHELL@`: generate it again after an upgrade.
"""

_BASH = (
    _HEADER.replace("@SHELL@", "bash")
    + """
@TABLES@
_@NAME@() {
    local cur=${COMP_WORDS[COMP_CWORD]} node='' pending='' word values i
    # The node: the subcommands typed so far; an option taking a value swallows the next word
    # (bash splits --format=json at "=", so "=" keeps the option pending).
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if [[ -n $pending ]]; then
            [[ $word == = ]] || pending=''
            continue
        fi
        case $word in
            -*=*) ;;
            -*) [[ " $(_@NAME@_valued "$node") " == *" $word "* ]] && pending=$word ;;
            *) [[ " $(_@NAME@_commands "$node") " == *" $word "* ]] && node=${node:+$node }$word ;;
        esac
    done
    [[ $cur == = ]] && cur=''
    if [[ -n $pending ]]; then
        values=$(_@NAME@_values "$node|$pending")
    elif [[ $cur == -* ]]; then
        values=$(_@NAME@_options "$node")
    else
        values="$(_@NAME@_commands "$node") $(_@NAME@_positional "$node")"
    fi
    if [[ $values == *@files* ]]; then
        compopt -o filenames 2>/dev/null
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    else
        mapfile -t COMPREPLY < <(compgen -W "$values" -- "$cur")
    fi
}
complete -F _@NAME@ @PROG@
"""
)

_ZSH = (
    "#compdef @PROG@\n"
    + _HEADER.replace("@SHELL@", "zsh")
    + """
@TABLES@
_@PROG@() {
    local cur=${words[CURRENT]} node='' pending='' word values i
    # The node: the subcommands typed so far; an option taking a value swallows the next word.
    for ((i = 2; i < CURRENT; i++)); do
        word=${words[i]}
        if [[ -n $pending ]]; then
            pending=''
            continue
        fi
        case $word in
            -*=*) ;;
            -*) [[ " $(_@NAME@_valued "$node") " == *" $word "* ]] && pending=$word ;;
            *) [[ " $(_@NAME@_commands "$node") " == *" $word "* ]] && node=${node:+$node }$word ;;
        esac
    done
    if [[ -n $pending ]]; then
        values=$(_@NAME@_values "$node|$pending")
    elif [[ $cur == -*=* ]]; then
        values=$(_@NAME@_values "$node|${cur%%=*}")
        compset -P '*='
    elif [[ $cur == -* ]]; then
        values=$(_@NAME@_options "$node")
    else
        values="$(_@NAME@_commands "$node") $(_@NAME@_positional "$node")"
    fi
    if [[ $values == *@files* ]]; then
        _files
    else
        compadd -- ${=values}
    fi
}
# Installed in $fpath this file is the body of _@PROG@ (run at each completion); sourced, it registers.
if [[ ${funcstack[1]} == _@PROG@ ]]; then
    _@PROG@ "$@"
else
    compdef _@PROG@ @PROG@
fi
"""
)


def install_help(prog: str) -> str:
    """The completion command's epilog: how to install the script, then examples."""
    return (
        "install (bash):\n"
        "  mkdir -p ~/.local/share/bash-completion/completions\n"
        f"  {prog} completion bash > ~/.local/share/bash-completion/completions/{prog}   # this user\n"
        f"  {prog} completion bash > /etc/bash_completion.d/{prog}   # everyone (as root)\n"
        f"  or in ~/.bashrc: source <({prog} completion bash)\n"
        "install (zsh):\n"
        f'  {prog} completion zsh > "${{fpath[1]}}/_{prog}"   # then start a new shell\n'
        f"  or in ~/.zshrc, after compinit: source <({prog} completion zsh)\n"
        "A new shell completes commands, subcommands, options and their choices, and file names for\n"
        "options taking a file. Generate the script again after an upgrade.\n\n"
        + examples(prog, "completion bash", "completion zsh")
    )


def add_parser(sub: Any, prog: str) -> argparse.ArgumentParser:
    """Add the ``completion`` command to a command line's subcommands; return its parser."""
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description=f"Print a completion script for {prog}, made from its commands and options as "
        "they are now: source it, or install it where the shell looks for completions.",
        epilog=install_help(prog),
        formatter_class=ExamplesHelpFormatter,
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell: bash or zsh")
    return completion


def print_script(parser: argparse.ArgumentParser, shell: str) -> int:
    sys.stdout.write(script(parser, shell))
    return 0
