"""Both command lines: every command documented, every error one readable line and a non-zero exit."""

from __future__ import annotations

import json
import shlex
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

from agent.cli import build_parser as agent_parser
from collector.cli import build_parser as collector_parser
from collector.store import open_database


def subcommands(parser) -> dict[str, object]:  # type: ignore[no-untyped-def]
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return dict(action.choices)


def command_tree(parser, path: str = ""):  # type: ignore[no-untyped-def]
    """(path, parser) of every command and subcommand below ``parser``, depth first."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield f"{path} {name}".strip(), sub
                yield from command_tree(sub, f"{path} {name}".strip())


@pytest.mark.parametrize(
    ("program", "parser"), [("zonewatch-agent", agent_parser), ("zonewatch-collector", collector_parser)]
)
def test_every_command_has_help_and_description(program: str, parser) -> None:  # type: ignore[no-untyped-def]
    commands = subcommands(parser())
    assert commands
    for name in commands:
        result = run_cli(program, name, "--help")
        assert "usage:" in result.stdout
    for path, sub in command_tree(parser()):
        assert sub.description, f"{program} {path} has no description"
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{program} {path} {action.option_strings} has no help text"


@pytest.mark.parametrize(
    ("program", "parser"), [("zonewatch-agent", agent_parser), ("zonewatch-collector", collector_parser)]
)
def test_every_command_has_examples(program: str, parser) -> None:  # type: ignore[no-untyped-def]
    """Every command and subcommand ends its --help with examples an operator can copy, laid out one per
    line (a formatter that re-wraps the epilog would run them together)."""
    tree = list(command_tree(parser()))
    assert program == "zonewatch-agent" or "incidents list" in dict(tree)  # the walk reaches subcommands
    for path, sub in tree:
        epilog = sub.epilog or ""
        assert "example" in epilog.lower(), f"{program} {path} has no examples epilog"
        examples = [line.strip() for line in epilog.splitlines() if line.strip().startswith(f"{program} ")]
        assert examples, f"{program} {path}: no example line starts with {program}"
        shown = {line.strip() for line in sub.format_help().splitlines()}
        for example in examples:
            assert example in shown, f"{program} {path} --help does not show {example!r} on a line of its own"


def test_commands_are_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for program, parser in (("zonewatch-agent", agent_parser), ("zonewatch-collector", collector_parser)):
        for name in subcommands(parser()):
            assert f"{program} {name}" in readme, f"README does not mention `{program} {name}`"


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_missing_database(tmp_path: Path) -> None:
    result = run_cli("zonewatch-collector", "agents", "--db", str(tmp_path / "nope.db"), check=False)
    assert "no database at" in one_line_error(result)
    assert not (tmp_path / "nope.db").exists(), "a query must not create a database"


def test_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    result = run_cli("zonewatch-collector", "bandwidth", "--db", str(junk), check=False)
    assert "junk.db" in one_line_error(result)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "c.db"
    open_database(path).close()
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--agent", "no-such-host"], "unknown agent"),
        (["--since", "yesterday-ish"], "malformed time"),
        (["--since", "1h", "--until", "2h"], "since"),
        (["--top", "0"], "top"),
    ],
)
def test_bandwidth_bad_input(db: Path, args: list[str], expected: str) -> None:
    result = run_cli("zonewatch-collector", "bandwidth", "--db", str(db), *args, check=False)
    assert expected in one_line_error(result)


def test_empty_database_queries(db: Path) -> None:
    assert (
        json.loads(run_cli("zonewatch-collector", "agents", "--db", str(db), "--format", "json").stdout) == []
    )
    out = run_cli("zonewatch-collector", "bandwidth", "--db", str(db), "--format", "csv").stdout
    assert out.splitlines()[0].startswith("hostname,")


def test_serve_refuses_a_bad_listen_address(tmp_path: Path) -> None:
    result = run_cli(
        "zonewatch-collector",
        "serve",
        "--db",
        str(tmp_path / "c.db"),
        "--listen",
        "256.1.1.1:1",
        "--insecure",
        check=False,
    )
    assert "cannot listen" in result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2


def test_agent_once_json_prints_what_would_be_sent() -> None:
    result = run_cli(
        "zonewatch-agent",
        "once",
        "--json",
        "--interface",
        "lo",
        "--interval",
        "0.2",
        "--department",
        "市财政局",
    )
    report = json.loads(result.stdout)
    assert report["hello"]["labels"]["department"] == "市财政局"
    facts = report["batch"]["facts"]
    assert [f["interface_sample"]["interface"] for f in facts] == ["lo"]
    assert int(facts[0]["interface_sample"]["interval_ms"]) >= 150


def test_agent_bad_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('colector = "x:1"\n', encoding="utf-8")
    result = run_cli("zonewatch-agent", "once", "--config", str(config), check=False)
    assert "colector" in one_line_error(result)


def test_agent_status_without_state(tmp_path: Path) -> None:
    result = run_cli("zonewatch-agent", "status", "--state-dir", str(tmp_path / "none"), check=False)
    assert "no agent state" in one_line_error(result)


def test_database_is_wal(db: Path) -> None:
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.close()


def test_traffic_and_zones_commands(db: Path, tmp_path: Path) -> None:
    empty = run_cli("zonewatch-collector", "traffic", "--db", str(db)).stdout
    assert "no zone traffic in range" in empty
    assert (
        json.loads(run_cli("zonewatch-collector", "traffic", "--db", str(db), "--format", "json").stdout)
        == []
    )
    sample = Path(__file__).resolve().parent.parent / "deploy" / "zones.sample.yaml"
    assert "OK, 9 zones" in run_cli("zonewatch-collector", "zones", "validate", str(sample)).stdout
    shown = json.loads(
        run_cli("zonewatch-collector", "zones", "show", str(sample), "--format", "json").stdout
    )
    assert {z["kind"] for z in shown} == {"extranet", "dedicated", "internet", "classified", "local"}
    broken = tmp_path / "zones.yaml"
    broken.write_text(
        "zones:\n  - name: 外网\n    kind: extranet\n    cidrs: [10.0.0.0/8]\n", encoding="utf-8"
    )
    error = one_line_error(run_cli("zonewatch-collector", "zones", "validate", str(broken), check=False))
    assert f"{broken}:2:" in error
    bad_address = run_cli(
        "zonewatch-collector", "zones", "show", str(sample), "--address", "not-ip", check=False
    )
    assert "not an IP address" in one_line_error(bad_address)


def complete(script: str, *words: str) -> list[str]:
    """What bash offers after ``words`` (the last one being completed), with the script sourced."""
    line = " ".join(shlex.quote(w) for w in words)
    program = (
        f"source /dev/stdin\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMPREPLY=()\n"
        f"{complete_function(words[0])}\nprintf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    result = subprocess.run(["bash", "-c", program], input=script, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def complete_function(program: str) -> str:
    return "_" + program.replace("-", "_")


@pytest.mark.parametrize("program", ["zonewatch-collector", "zonewatch-agent"])
def test_bash_completion_from_the_parser(program: str, tmp_path: Path) -> None:
    script = run_cli(program, "completion", "bash").stdout
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    if program == "zonewatch-agent":
        assert complete(script, program, "st") == ["status"]
        assert "--state-dir" in complete(script, program, "run", "--st")
        return
    assert complete(script, program, "inc") == ["incidents"]
    assert complete(script, program, "incidents", "l") == ["list"]
    assert sorted(complete(script, program, "incidents", "list", "--fo")) == ["--follow", "--format"]
    assert complete(script, program, "incidents", "list", "--format", "") == ["table", "json", "csv"]
    assert complete(script, program, "incidents", "list", "--db", "x.db", "--sev") == ["--severity"]
    assert complete(script, program, "completion", "") == ["bash", "zsh"]
    (tmp_path / "zones.yaml").write_text("zones: []\n", encoding="utf-8")
    assert complete(script, program, "zones", "validate", str(tmp_path / "zo")) == [
        str(tmp_path / "zones.yaml")
    ]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_from_the_parser() -> None:
    script = run_cli("zonewatch-collector", "completion", "zsh").stdout
    assert script.startswith("#compdef zonewatch-collector\n")
    checked = subprocess.run(["zsh", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    # compadd and compdef are zsh's completion system; stand-ins print what would be offered.
    program = (
        'compdef() { print -r -- "compdef $*"; }; compadd() { shift; print -r -- "$*"; }\n'
        "source /dev/stdin\n"
        "words=(zonewatch-collector incidents list --format ''); CURRENT=5; _zonewatch-collector\n"
        "words=(zonewatch-collector inc); CURRENT=2; _zonewatch-collector\n"
    )
    result = subprocess.run(
        ["zsh", "-f", "-c", program], input=script, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    registered, choices, commands = result.stdout.splitlines()
    assert registered == "compdef _zonewatch-collector zonewatch-collector"
    assert choices == "table json csv"
    assert "incidents" in commands.split()
