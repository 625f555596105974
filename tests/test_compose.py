"""The compose files, validated without a Docker engine.

They parse; every command is a real ``tradebus`` command whose flags its own parser
accepts; every environment variable is a setting the service's command really reads, with
a value it accepts; health checks probe real routes on the port the service listens on;
every URL naming another service uses a port that service listens on.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bot_client.settings import SPECS, PublisherSettings
from bridge.app import create_app
from bridge.cli import config_from_args
from bridge.config import ENV_PREFIX, BridgeConfig
from monitoring.logging import LEVEL_VARIABLES
from monitoring.metrics import MetricsServer
from tests.conftest import scaled
from tradebus.cli import COMMANDS, build_parser

COMPOSE = Path(__file__).resolve().parent.parent / "compose"
BASE = COMPOSE / "docker-compose.yml"
OVERRIDE = COMPOSE / "docker-compose.websocket.yml"
ROLES = {"bus-proxy", "dashboard-backend", "ai-trading-bot", "websocket-tester"}
SETTING_PREFIXES = ("TRADEBUS", "SYSTEM__", "LOG_LEVEL")
REQUIRED_ARGUMENTS = {"record": ["out.jsonl"], "replay": ["in.jsonl"]}


# -- reading compose files the way docker compose does (the parts used here) --------------------
def interpolate(value: Any) -> Any:
    """``${VAR:-default}`` -> default, ``${VAR:?message}`` -> a stand-in value."""
    if isinstance(value, str):
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
        return re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "stand-in-secret", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path.name} is not a mapping"
    result: dict[str, Any] = interpolate(document)
    return result


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge: mappings merge key by key, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def stacks() -> Iterator[tuple[str, dict[str, Any]]]:
    base = load(BASE)
    yield "base", base
    yield "websocket", merge(base, load(OVERRIDE))


STACKS = dict(stacks())


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list), "commands are lists (no shell parsing surprises)"
    return [str(part) for part in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment is a mapping"
    return {str(k): str(v) for k, v in env.items()}


def services(stack: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = STACKS[stack]["services"]
    return found


# -- what a command really does with its arguments and environment ------------------------------
def clean_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in list(os.environ):
        if name.startswith(SETTING_PREFIXES):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def parse(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser(argv[0]).parse_args(argv)
    except SystemExit as exit_:
        raise AssertionError(f"tradebus rejects {argv}") from exit_


def effective(argv: list[str]) -> dict[str, Any]:
    """Everything the command would run with, given the current environment."""
    args = parse(argv)
    result: dict[str, Any] = {"args": vars(args)}
    if argv[0] == "bridge":
        result["bridge"] = config_from_args(args)
    if argv[0] in ("up",):
        result["bridge"] = BridgeConfig.from_env()
    if argv[0] in ("demo", "up"):
        result["publisher"] = PublisherSettings.from_env(enabled=True)
    return result


def settings_read_by(command: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Environment variables ``tradebus <command>`` reads, found by trying each one."""
    names = set(LEVEL_VARIABLES)
    if command == "bridge" or command == "up":
        names |= {ENV_PREFIX + f.name.upper() for f in fields(BridgeConfig)}
    if command in ("demo", "up"):
        names |= {spec.variable for spec in SPECS}
    # flags whose default comes from a variable: setting it changes the parsed default
    parser = build_parser(command)
    actions = parser._subparsers._group_actions[0].choices[command]._actions  # type: ignore[union-attr]
    candidates = {"TRADEBUS_TOKEN", "TRADEBUS_KEYS", "TRADEBUS_KEY_NAME"} | {
        f"TRADEBUS__{part}_{a.dest.upper()}"
        for a in actions
        for part in ("PROXY", "BRIDGE", "UP")
        if a.dest != "help"
    }
    argv = [command, *REQUIRED_ARGUMENTS.get(command, [])]
    clean_environment(monkeypatch, {})
    baseline = vars(parse(argv))
    for name in candidates:
        with monkeypatch.context() as patch:
            patch.setenv(name, "7")
            try:
                changed = vars(build_parser(command).parse_args(argv)) != baseline
            except SystemExit:
                changed = True  # the variable was read, and "7" is not valid for it
        if changed:
            names.add(name)
    return names


# -- the tests -----------------------------------------------------------------------------------
def test_files_parse_with_the_guides_services_and_network() -> None:
    base = STACKS["base"]
    assert set(base["services"]) == ROLES
    assert "trading-network" in base["networks"]
    for name, service in base["services"].items():
        assert service["networks"] == ["trading-network"], name
        assert service["image"] == "tradebus:latest", "one image for every role"
        assert service["build"]["dockerfile"] == "compose/Dockerfile"
    assert base["services"]["websocket-tester"]["profiles"] == ["debug"]
    assert set(load(OVERRIDE)["services"]) <= ROLES


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_every_command_is_a_real_tradebus_command(stack: str) -> None:
    for name, service in services(stack).items():
        command = command_of(service)
        assert command[0] in COMMANDS, f"{name}: no command `tradebus {command[0]}`"
        parse(command)


def test_each_command_used_answers_help() -> None:
    used = {command_of(s)[0] for stack in STACKS for s in services(stack).values()}
    for command in sorted(used):
        result = subprocess.run(
            [sys.executable, "-m", "tradebus", command, "--help"],
            capture_output=True,
            text=True,
            timeout=scaled(30),
        )
        assert result.returncode == 0, result.stderr
        assert f"usage: tradebus {command}" in result.stdout


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_every_variable_is_a_setting_the_service_reads_with_a_valid_value(
    stack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in services(stack).items():
        command = command_of(service)
        env = environment_of(service)
        known = settings_read_by(command[0], monkeypatch)
        unknown = sorted(set(env) - known)
        assert not unknown, f"{stack}/{name}: `tradebus {command[0]}` reads no {unknown}"
        clean_environment(monkeypatch, env)
        try:
            effective(command)
        except Exception as error:  # a value the setting refuses
            pytest.fail(f"{stack}/{name}: {error}")
        for variable, value in env.items():
            if variable in LEVEL_VARIABLES:
                continue
            clean_environment(monkeypatch, {k: v for k, v in env.items() if k != variable})
            without = effective(command)
            clean_environment(monkeypatch, env)
            with_it = effective(command)
            if without == with_it:
                # only acceptable when the value restates the default (the guide's table)
                spec = next((s for s in SPECS if s.variable == variable), None)
                assert spec is not None, f"{stack}/{name}: {variable}={value} has no effect"
                assert spec.parse(value) == getattr(PublisherSettings(), spec.field)


def listening_ports(name: str, service: dict[str, Any], stack: str) -> set[int]:
    """The ports a service's process binds, from its real effective configuration."""
    command = command_of(service)
    with pytest.MonkeyPatch.context() as patch:
        clean_environment(patch, environment_of(service))
        config = effective(command)
    args = argparse.Namespace(**config["args"])
    ports: set[int] = set()
    if command[0] == "proxy":
        for endpoint in (args.frontend, args.backend, args.snapshot):
            port = urlsplit(endpoint).port
            assert port is not None, f"{name}: {endpoint} has no fixed port"
            ports.add(port)
    if "bridge" in config:
        ports.add(config["bridge"].port)
    if getattr(args, "metrics_port", None):
        ports.add(args.metrics_port)
    return ports


def urls_in(service: dict[str, Any]) -> Iterator[str]:
    for text in [*command_of(service), *environment_of(service).values()]:
        yield from re.findall(r"(?:tcp|ws|wss|http)://[^\s'\"]+", text)
    if "--docker-url" in command_of(service):
        from tradebus.tap import DOCKER_URL

        yield DOCKER_URL


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_ports_agree_across_services(stack: str) -> None:
    all_services = services(stack)
    ports = {name: listening_ports(name, s, stack) for name, s in all_services.items()}
    assert ports["bus-proxy"] == {5555, 5556, 5557, 9100}
    assert ports["dashboard-backend"] == {8000}
    checked = 0
    for name, service in all_services.items():
        for url in urls_in(service):
            parts = urlsplit(url)
            if parts.hostname in all_services:
                assert parts.port in ports[parts.hostname], (
                    f"{stack}/{name}: {url} but {parts.hostname} listens on "
                    f"{sorted(ports[parts.hostname])}"
                )
                checked += 1
        for mapping in service.get("ports", []):
            host, _, container = str(mapping).rpartition(":")
            assert int(container) in ports[name], f"{name} publishes {mapping}"
            assert host, f"{name}: publish with an explicit host port"
        for exposed in service.get("expose", []):
            assert int(exposed) in ports[name], f"{name} exposes {exposed} but does not bind it"
        for needed in service.get("depends_on", {}):
            assert needed in all_services, f"{name} depends on missing {needed}"
    assert checked >= 4, "the services must reach each other by container name"


def routes_of(command: str) -> set[str]:
    if command in ("bridge", "up"):
        app = create_app(BridgeConfig())
        return {
            info.get("path", info.get("formatter", ""))
            for info in (r.get_info() for r in app.router.resources())
        }
    return set(MetricsServer.ROUTES)


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_health_checks_probe_real_routes_on_real_ports(stack: str) -> None:
    all_services = services(stack)
    probed = set()
    for name, service in all_services.items():
        check = service.get("healthcheck")
        if check is None:
            continue
        test = " ".join(check["test"])
        urls = re.findall(r"http://[^'\"\s]+", test)
        assert len(urls) == 1, f"{name}: health check should probe one URL: {test}"
        parts = urlsplit(urls[0])
        assert parts.hostname in ("127.0.0.1", "localhost")
        assert parts.port in listening_ports(name, service, stack), f"{name}: {urls[0]}"
        assert parts.path == "/health"
        assert parts.path in routes_of(command_of(service)[0]), f"{name}: no route {parts.path}"
        probed.add(name)
        for needed, condition in service.get("depends_on", {}).items():
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in all_services[needed], f"{needed} has no health check"
    assert probed == {"bus-proxy", "dashboard-backend", "ai-trading-bot"}


def test_the_override_makes_the_bot_publish_over_websocket_by_container_name() -> None:
    bot = services("websocket")["ai-trading-bot"]
    with pytest.MonkeyPatch.context() as patch:
        clean_environment(patch, environment_of(bot))
        settings = PublisherSettings.from_env()
    assert settings.enabled
    assert settings.url == "ws://dashboard-backend:8000/ws"
    assert settings.transport == "ws"
    backend = services("websocket")["dashboard-backend"]
    with pytest.MonkeyPatch.context() as patch:
        clean_environment(patch, environment_of(backend))
        config = config_from_args(parse(command_of(backend)))
    bot_address = bot["networks"]["trading-network"]["ipv4_address"]
    assert config.publish_trusted(bot_address), "the bot's address may publish"
    # browsers on the host arrive from the network's gateway: they must not be trusted
    assert not config.publish_trusted("172.28.0.1")
    assert not config.auth_required, "viewers need no token"
    base_bot = services("base")["ai-trading-bot"]
    with pytest.MonkeyPatch.context() as patch:
        clean_environment(patch, environment_of(base_bot))
        assert PublisherSettings.from_env().transport == "zmq"


def test_dockerfile_copies_what_exists_and_runs_tradebus() -> None:
    lines = [
        line.strip()
        for line in (COMPOSE / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0].startswith("FROM python:3.11")
    root = COMPOSE.parent
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (root / source).exists(), f"Dockerfile copies missing {source}"
    assert 'ENTRYPOINT ["tradebus"]' in lines
    command = re.search(r"CMD (\[.*\])", "\n".join(lines))
    assert command is not None
    parse(yaml.safe_load(command.group(1)))
    packages = re.findall(r"COPY (\w+) \./\1", "\n".join(lines))
    pyproject = (root / "pyproject.toml").read_text()
    listed = re.search(r"packages = \[([^\]]*)\]", pyproject)
    assert listed is not None
    assert set(packages) == set(re.findall(r'"(\w+)"', listed.group(1)))
