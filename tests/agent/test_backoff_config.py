"""Reconnect backoff with a scripted random source, and the agent's config from TOML files and flags."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import agent.config
from agent.backoff import Backoff
from agent.config import DEFAULT_COLLECTOR, AgentConfig, load_config
from agent.errors import AgentError, ConfigError


@pytest.fixture(autouse=True)
def no_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep /etc/zonewatch/agent.toml, present or not on this machine, out of every test."""
    monkeypatch.setattr(agent.config, "DEFAULT_CONFIG", tmp_path / "no-such-dir" / "agent.toml")
    yield


# --- backoff ----------------------------------------------------------------------------------


def schedule(backoff: Backoff, count: int) -> list[float]:
    return [backoff.next_delay() for _ in range(count)]


def test_least_jitter_is_half_the_base_doubling_to_the_cap() -> None:
    backoff = Backoff(initial_s=1.0, maximum_s=8.0, rand=lambda: 0.0)
    assert schedule(backoff, 6) == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.attempts == 6


def test_most_jitter_is_the_full_base_doubling_to_the_cap() -> None:
    backoff = Backoff(initial_s=1.0, maximum_s=8.0, rand=lambda: 1.0)
    assert schedule(backoff, 6) == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_cap_between_steps_is_reached_exactly() -> None:
    backoff = Backoff(initial_s=0.5, maximum_s=3.0, multiplier=3.0, rand=lambda: 1.0)
    assert schedule(backoff, 4) == [0.5, 1.5, 3.0, 3.0]


def test_jitter_lies_between_half_and_whole_base() -> None:
    draws = iter([0.25, 0.5, 0.75])
    backoff = Backoff(initial_s=2.0, maximum_s=60.0, rand=lambda: next(draws))
    assert schedule(backoff, 3) == [1.25, 3.0, 7.0]


def test_reset_starts_the_schedule_again() -> None:
    backoff = Backoff(initial_s=0.1, maximum_s=10.0, rand=lambda: 1.0)
    schedule(backoff, 5)
    backoff.reset()
    assert backoff.attempts == 0
    assert schedule(backoff, 3) == pytest.approx([0.1, 0.2, 0.4])


@pytest.mark.parametrize(
    ("initial_s", "maximum_s"),
    [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0), (1.0, float("nan"))],
    ids=["zero", "negative", "initial-above-cap", "nan-initial", "nan-cap"],
)
def test_invalid_bounds_are_refused(initial_s: float, maximum_s: float) -> None:
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial_s=initial_s, maximum_s=maximum_s)


@pytest.mark.parametrize("multiplier", [0.0, 0.5], ids=["zero", "shrinking"])
def test_a_multiplier_that_does_not_grow_is_refused(multiplier: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial_s=1.0, maximum_s=8.0, multiplier=multiplier)


# --- config -----------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


FULL = """\
collector = "collector.zw.gov.example:7390"
state_dir = "/srv/zonewatch"
interval = 15
interfaces = ["eth0", "政务外网"]
hostname = "web-01"
spool_max_mb = 64

[labels]
department = "市公安局"
county = "高新区"
site = "主机房"
role = "server"
"""


def test_without_a_file_or_flags_the_defaults_apply() -> None:
    assert load_config(None, {}) == AgentConfig()
    assert load_config(None, {}).collector == DEFAULT_COLLECTOR


def test_every_file_setting_is_read(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), {})
    assert config == AgentConfig(
        collector="collector.zw.gov.example:7390",
        state_dir=Path("/srv/zonewatch"),
        interval_s=15.0,
        interfaces=("eth0", "政务外网"),
        hostname="web-01",
        spool_max_bytes=64 * 1024 * 1024,
        department="市公安局",
        county="高新区",
        site="主机房",
        role="server",
    )
    assert isinstance(config.interval_s, float)
    assert config.spool_path == Path("/srv/zonewatch/spool.db")
    assert config.labels == {"department": "市公安局", "county": "高新区", "site": "主机房", "role": "server"}


def test_the_default_file_is_read_when_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        agent.config, "DEFAULT_CONFIG", write(tmp_path, 'interval = 30\n[labels]\ncounty = "高新区"\n')
    )
    config = load_config(None, {})
    assert (config.interval_s, config.county) == (30.0, "高新区")


def test_flags_beat_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    config = load_config(path, {"collector": "10.1.2.3:9000", "interval_s": 2.5, "department": "市教育局"})
    assert (config.collector, config.interval_s, config.department) == ("10.1.2.3:9000", 2.5, "市教育局")
    # What the flags did not name still comes from the file.
    assert (config.county, config.interfaces, config.hostname) == ("高新区", ("eth0", "政务外网"), "web-01")


def test_flags_left_unset_do_not_hide_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), {"collector": None, "interval_s": None, "department": None})
    assert (config.collector, config.interval_s, config.department) == (
        "collector.zw.gov.example:7390",
        15.0,
        "市公安局",
    )


def test_an_unknown_file_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, 'collector = "h:1"\nintervall = 10\n')
    with pytest.raises(ConfigError, match="'intervall'") as caught:
        load_config(path, {})
    assert str(path) in str(caught.value)


def test_an_unknown_label_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'区县'"):
        load_config(write(tmp_path, '[labels]\n"区县" = "高新区"\n'), {})


def test_an_unknown_flag_is_named() -> None:
    with pytest.raises(ConfigError, match="no_such_flag"):
        load_config(None, {"no_such_flag": 1})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('interval = "10"\n', "interval"),
        ('interfaces = "eth0"\n', "interfaces"),
        ("collector = 7390\n", "collector"),
        ("spool_max_mb = 1.5\n", "spool_max_mb"),
        ('labels = "市公安局"\n', "labels"),
        ("[labels]\ndepartment = 1\n", "department"),
        ("interval = true\n", "interval"),
        ("interfaces = [1, 2]\n", "interfaces"),
    ],
    ids=[
        "interval-string",
        "interfaces-string",
        "collector-int",
        "spool-float",
        "labels-string",
        "label-int",
        "interval-bool",
        "interfaces-ints",
    ],
)
def test_a_wrong_type_is_refused(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=key) as caught:
        load_config(path, {})
    assert str(path) in str(caught.value)


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'collector = "unterminated\n', name="坏的.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert str(path) in str(caught.value)


def test_a_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_config(path, {})
    assert str(path) in str(caught.value)


def test_a_directory_given_as_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_config(tmp_path, {})


@pytest.mark.parametrize("interval", ["0", "-5", "nan"], ids=["zero", "negative", "nan"])
def test_a_non_positive_interval_in_the_file_is_refused(tmp_path: Path, interval: str) -> None:
    with pytest.raises(ConfigError, match="interval must be > 0"):
        load_config(write(tmp_path, f"interval = {interval}\n"), {})


def test_a_non_positive_interval_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match="interval must be > 0"):
        load_config(None, {"interval_s": 0.0})


@pytest.mark.parametrize(
    "collector",
    [
        "collector.zw.gov.example",
        "10.0.0.5",
        "collector.zw.gov.example:",
        "[fd00::5]",
    ],
)
def test_a_collector_without_port_is_refused(tmp_path: Path, collector: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(write(tmp_path, f'collector = "{collector}"\n'), {})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(None, {"collector": collector})


def test_config_errors_are_agent_errors() -> None:
    assert issubclass(ConfigError, AgentError)


def test_a_cap_bounds_one_delay_and_the_growth_behind_it() -> None:
    from agent.backoff import Backoff

    backoff = Backoff(0.5, 60.0, rand=lambda: 1.0)
    delays = [backoff.next_delay(8.0) for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]  # unreachable: never more than 8 s apart
    # A refusal after that resumes the doubling from the cap.
    assert [backoff.next_delay(), backoff.next_delay()] == [8.0, 16.0]
