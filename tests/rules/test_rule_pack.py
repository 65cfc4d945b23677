"""The default rule pack as a corpus: every file loads, its samples behave, and its README stays true.

Rules are reviewed data; this test is what keeps them honest. Each rules/*.yml must load through the same
loader the collector uses and every one of its sample cases must raise (match) or stay silent (no_match)
as it says, so a later edit that loosens or breaks a rule fails here with the rule, the case and its line.
The README's worked example and its table of the default pack are checked the same way, so the
documentation cannot drift from the rules it describes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from collector.rules.load import Rule, load_rule_file, load_rules
from collector.rules.samples import check_samples

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
README = RULES_DIR / "README.md"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
# Every rule of the pack says where it comes from and what may set it off by mistake.
REQUIRED_KEYS = ("title", "id", "name", "status", "level", "description", "references", "falsepositives",
                 "tags", "author", "date", "samples")  # fmt: skip


def first_document(path: Path) -> dict[str, object]:
    """The rule that raises incidents: the only document, or the correlation ahead of its detections."""
    document = next(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert isinstance(document, dict), f"{path.name}: the first document is not a mapping"
    return document


def test_the_pack_is_not_empty() -> None:
    # A moved directory would otherwise make every parametrized test below vanish silently.
    assert len(RULE_FILES) >= 13


@pytest.mark.parametrize("path", RULE_FILES, ids=[path.stem for path in RULE_FILES])
def test_rule_loads_and_its_samples_pass(path: Path) -> None:
    rule = load_rule_file(path)
    failures = check_samples(rule)
    assert not failures, "\n".join(str(failure) for failure in failures)


@pytest.mark.parametrize("path", RULE_FILES, ids=[path.stem for path in RULE_FILES])
def test_rule_follows_the_pack_conventions(path: Path) -> None:
    rule = load_rule_file(path)
    document = first_document(path)
    missing = [key for key in REQUIRED_KEYS if not document.get(key)]
    assert not missing, f"{path.name}: missing or empty {missing}"
    # The short name is the file's name: operators find a rule from an incident by it.
    assert rule.name == path.stem
    assert document["author"] == "zonewatch"
    # Near misses need company: at least two cases each way, as the pack's README asks.
    assert len(rule.samples_match) >= 2, f"{path.name}: fewer than 2 match cases"
    assert len(rule.samples_no_match) >= 2, f"{path.name}: fewer than 2 no_match cases"
    if rule.correlation is None:
        # A detection rule that raises incidents says which fields make one incident.
        assert "dedup-by" in document, f"{path.name}: no dedup-by"


def test_the_pack_loads_as_a_whole() -> None:
    # Loading the directory also refuses an id or name that two files share.
    rules, errors = load_rules(RULES_DIR)
    assert not errors, "\n".join(str(error) for error in errors)
    assert sorted(rule.name for rule in rules) == sorted(path.stem for path in RULE_FILES)


def pack_table_names() -> list[str]:
    """The rule names in the first column of the README's "The default pack" table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## The default pack", 1)[1]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE)


def test_readme_lists_every_rule_of_the_pack() -> None:
    rules = {path.stem: load_rule_file(path) for path in RULE_FILES}
    listed = pack_table_names()
    assert sorted(listed) == sorted(rules), "rules/README.md's table and rules/*.yml disagree"
    section = README.read_text(encoding="utf-8").split("## The default pack", 1)[1]
    for name, rule in rules.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"| {rule.level} |" in row, f"README gives {name} another level than its file ({rule.level})"


def readme_example(tmp_path: Path) -> Rule:
    """The README's worked example, written out as the rule file it shows."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    (example,) = [block for block in blocks if "\nname: telnet_attempt\n" in block]
    path = tmp_path / "telnet_attempt.yml"
    path.write_text(example, encoding="utf-8")
    return load_rule_file(path)


def test_readme_worked_example_loads_and_its_samples_pass(tmp_path: Path) -> None:
    rule = readme_example(tmp_path)
    assert rule.dedup_by == ("agent_id", "peer_addr")
    failures = check_samples(rule)
    assert not failures, "\n".join(str(failure) for failure in failures)
