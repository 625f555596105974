"""README.md stays true: the two commands, every setting, every command, every metric."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client import CollectorRegistry

from bot_client.publisher import Publisher
from bot_client.settings import SPECS
from bridge.app import BRIDGE_KEY, create_app
from bridge.config import ENV_PREFIX, BridgeConfig
from bus.endpoints import BACKEND_VARIABLE, FRONTEND_VARIABLE, SNAPSHOT_VARIABLE
from bus.gate import GateStats
from bus.proxy import CacheStats
from bus.transport import ACCELERATOR_OFF_VARIABLE
from monitoring.logging import LEVEL_VARIABLES
from monitoring.metrics import ProxyCollector, PublisherCollector
from tests.conftest import scaled
from tests.test_compose import settings_read_by
from tradebus.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# variables only compose files interpolate, and the tests' own knob
OTHER_VARIABLES = {
    "TRADEBUS_PUBLISH_TOKEN",
    "TRADEBUS_VIEW_TOKEN",
    "TRADEBUS_BUS_ADDRESS",
    "TRADEBUS_TEST_TIMEOUT_FACTOR",
}


def test_quick_start_is_the_two_commands() -> None:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]
    first_section = re.search(r"^## (.*)$", README, re.M)
    assert first_section is not None
    assert first_section.group(1).startswith("Quick start")


def test_screenshot_is_shown_and_exists() -> None:
    assert "](docs/dashboard.png)" in README
    assert (ROOT / "docs" / "dashboard.png").is_file()


def every_setting(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    names = {spec.variable for spec in SPECS}
    names |= {ENV_PREFIX + f.name.upper() for f in fields(BridgeConfig)}
    names |= set(LEVEL_VARIABLES) | {BACKEND_VARIABLE, SNAPSHOT_VARIABLE, FRONTEND_VARIABLE}
    names.add(ACCELERATOR_OFF_VARIABLE)
    for command in COMMANDS:
        names |= settings_read_by(command, monkeypatch)
    return names


def test_every_setting_is_in_the_table_and_every_listed_one_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = every_setting(monkeypatch)
    table_rows = [line for line in README.splitlines() if line.startswith("| `")]
    # a row documents the variables named in its first cell
    documented = {
        name for row in table_rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])
    }
    missing = sorted(settings - documented)
    assert not missing, f"README's settings tables lack {missing}"
    mentioned = set(re.findall(r"\b((?:SYSTEM__|TRADEBUS_)[A-Z0-9_]+)", README))
    unknown = sorted(mentioned - settings - OTHER_VARIABLES)
    assert not unknown, f"README mentions settings that do not exist: {unknown}"


def test_every_command_is_in_the_commands_table() -> None:
    for command in COMMANDS:
        assert f"| `tradebus {command}" in README, command


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    registry.register(
        ProxyCollector(
            lambda: CacheStats(by_type={"market_data": 1}),
            lambda: GateStats(rejected={"bad_topic": 1}),
            lambda: 0,
        )
    )
    registry.register(PublisherCollector(lambda: {"dropped": {"market_data": 1}}, "bot"))
    app = create_app(BridgeConfig())
    names = set()
    for source in (registry, app[BRIDGE_KEY].registry):
        for family in source.collect():
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_metrics_section_names_real_metrics() -> None:
    section = README.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    short = re.findall(r"`((?:proxy|publisher|bridge)_[a-z_]+)(?:\{[^}]*\})?`", section)
    listed = {f"tradebus_{name}" for name in short}
    listed |= set(re.findall(r"`(tradebus_(?:proxy|publisher|bridge)_[a-z_]+)", README))
    exported = exported_metric_names()
    unknown = sorted(listed - exported)
    assert not unknown, f"README names metrics nobody exports: {unknown}"
    assert len(listed) > 20


def test_the_readme_bot_metrics_example_works(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    section = README.split("A bot exports its own publisher's figures", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example is not None
    code = example.group(1).replace('host="0.0.0.0", port=9101', 'host="127.0.0.1", port=0')
    code = code.replace("MetricsServer(", "server = MetricsServer(")
    publisher = Publisher(url="tcp://127.0.0.1:1", source_id="readme-bot", context=zmq_context)
    namespace: dict[str, Any] = {"publisher": publisher}
    try:
        exec(compile(code, "README.md", "exec"), namespace)
        server = namespace["server"]
        try:
            with urllib.request.urlopen(server.url, timeout=scaled(5)) as reply:
                text = reply.read().decode()
        finally:
            server.close()
    finally:
        publisher.close(timeout=0)
    assert 'tradebus_publisher_connected{source="readme-bot"} 0.0' in text


def test_local_links_exist() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to missing {target}"


def test_no_file_names_a_path_of_the_machine_it_was_written_on() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    machine_path = re.compile(r"(?<![\w.~])/(?:work|home|root|Users|mnt|srv)/")
    found = []
    for name in tracked:
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary (docs/dashboard.png) or deleted in the working tree
        found += [f"{name}: {m.group(0)}" for m in machine_path.finditer(text)]
    assert not found
