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
import tomllib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from bot_client.settings import SPECS, PublisherSettings
from bridge.admission import HostPolicy
from bridge.app import create_app
from bridge.auth import Authenticator
from bridge.config import ENV_PREFIX, BridgeConfig
from bridge.errors import AuthError
from bus.errors import SettingError
from bus.settings import resolve
from monitoring.logging import LEVEL_VARIABLES
from monitoring.metrics import MetricsServer
from tests.conftest import scaled
from tradebus import proxy as proxy_cli
from tradebus import up
from tradebus.bridge import config_from_args
from tradebus.cli import COMMANDS, build_parser

COMPOSE = Path(__file__).resolve().parent.parent / "compose"
BASE = COMPOSE / "docker-compose.yml"
OVERRIDE = COMPOSE / "docker-compose.websocket.yml"
SECOND_BOT = COMPOSE / "docker-compose.second-bot.yml"
SCALE = COMPOSE / "docker-compose.scale.yml"
ROLES = {"bus-proxy", "dashboard-backend", "ai-trading-bot", "websocket-tester"}
KEYS_SERVICE = "keys"  # the one-shot service that makes the CURVE keys (compose/keys.sh)
SETTING_PREFIXES = ("TRADEBUS", "SYSTEM__", "LOG_LEVEL")
# check_stack.sh runs inside dashboard-backend (`docker compose exec`): the variables it
# reads may be set there for it
CHECK_STACK = COMPOSE / "check_stack.sh"
CHECK_STACK_VARIABLES = set(
    re.findall(r"\$\{(VIEW_TOKEN|PUBLISH_TOKEN|CHECK_STACK_SOURCE):-", CHECK_STACK.read_text())
)
REQUIRED_ARGUMENTS = {"record": ["out.jsonl"], "replay": ["in.jsonl"]}


# -- reading compose files the way docker compose does (the parts used here) --------------------
def interpolate(value: Any) -> Any:
    """``${VAR:-default}`` -> default, ``${VAR:?message}`` -> a stand-in value per VAR."""
    if isinstance(value, str):
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
        return re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", r"stand-in-\1", value)
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
    yield "second-bot", merge_services(base, load(SECOND_BOT))
    yield "scale", merge_services(base, load(SCALE))


def merge_services(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``merge``, except that a service's volumes add up (compose merges them by mount point)."""
    merged = merge(base, override)
    for name, service in override.get("services", {}).items():
        if "volumes" in service and name in base["services"]:
            earlier = base["services"][name].get("volumes", [])
            merged["services"][name]["volumes"] = [*earlier, *service["volumes"]]
    return merged


STACKS = dict(stacks())


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list), "commands are lists (no shell parsing surprises)"
    return [str(part) for part in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment is a mapping"
    return {str(k): str(v) for k, v in env.items()}


def all_services(stack: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = STACKS[stack]["services"]
    return found


def services(stack: str) -> dict[str, dict[str, Any]]:
    """The services that run a ``tradebus`` command: not the one-shot ``keys``, nor the
    scale variant's load balancer (another image)."""
    return {
        name: s
        for name, s in all_services(stack).items()
        if "entrypoint" not in s and s.get("image") == "tradebus:latest"
    }


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


SETTINGS_OF = {"proxy": proxy_cli.SETTINGS, "up": up.SETTINGS}


def resolved(argv: list[str]) -> argparse.Namespace:
    """The command's arguments as its run() uses them."""
    args = parse(argv)
    if argv[0] in SETTINGS_OF:
        # these commands keep their flags as text until run() resolves flag, variable, default
        resolve(args, SETTINGS_OF[argv[0]], os.environ, SettingError)
    return args


def effective(argv: list[str]) -> dict[str, Any]:
    """Everything the command would run with, given the current environment."""
    args = resolved(argv)
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
    candidates |= {setting.variable for setting in SETTINGS_OF.get(command, ())}
    argv = [command, *REQUIRED_ARGUMENTS.get(command, [])]
    clean_environment(monkeypatch, {})
    baseline = vars(resolved(argv))
    for name in candidates:
        with monkeypatch.context() as patch:
            patch.setenv(name, "7")
            try:
                changed = vars(resolved(argv)) != baseline
            except (SystemExit, SettingError):
                changed = True  # the variable was read, and "7" is not valid for it
        if changed:
            names.add(name)
    return names


# -- the tests -----------------------------------------------------------------------------------
def test_files_parse_with_the_guides_services_and_network() -> None:
    base = STACKS["base"]
    assert set(base["services"]) == ROLES | {KEYS_SERVICE}
    assert "trading-network" in base["networks"]
    for name, service in base["services"].items():
        assert service["networks"] == ["trading-network"], name
        assert service["image"] == "tradebus:latest", "one image for every role"
        assert service["build"]["dockerfile"] == "compose/Dockerfile"
    assert base["services"]["websocket-tester"]["profiles"] == ["debug"]
    assert set(load(OVERRIDE)["services"]) <= ROLES
    assert set(load(SECOND_BOT)["services"]) == {KEYS_SERVICE, "second-bot"}
    assert set(services("base")) == ROLES, "every other service runs a tradebus command"


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
        if command[0] == "bridge":
            known |= CHECK_STACK_VARIABLES
        unknown = sorted(set(env) - known)
        assert not unknown, f"{stack}/{name}: `tradebus {command[0]}` reads no {unknown}"
        clean_environment(monkeypatch, env)
        try:
            effective(command)
        except Exception as error:  # a value the setting refuses
            pytest.fail(f"{stack}/{name}: {error}")
        for variable, value in env.items():
            if variable in LEVEL_VARIABLES or variable in CHECK_STACK_VARIABLES:
                continue
            clean_environment(monkeypatch, {k: v for k, v in env.items() if k != variable})
            without = effective(command)
            clean_environment(monkeypatch, env)
            with_it = effective(command)
            if without == with_it:
                # only acceptable when the value restates the default (the guide's table)
                spec = next((s for s in SPECS if s.variable == variable), None)
                assert spec is not None, f"{stack}/{name}: {variable}={value} has no effect"
                assert spec.parse(value, SettingError) == getattr(PublisherSettings(), spec.field)


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
    stack_services = services(stack)
    ports = {name: listening_ports(name, s, stack) for name, s in stack_services.items()}
    assert ports["bus-proxy"] == {5555, 5556, 5557, 9100}
    assert ports["dashboard-backend"] == {8000}
    checked = 0
    for name, service in stack_services.items():
        for url in urls_in(service):
            parts = urlsplit(url)
            if parts.hostname in stack_services:
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
            assert needed in STACKS[stack]["services"], f"{name} depends on missing {needed}"
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
    stack_services = services(stack)
    probed = set()
    for name, service in stack_services.items():
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
                assert "healthcheck" in stack_services[needed], f"{needed} has no health check"
            else:
                assert needed == KEYS_SERVICE, f"{name} waits for {needed} without a health check"
                assert condition == {"condition": "service_completed_successfully"}
    assert probed == set(stack_services) - {"websocket-tester"}, "every long-running service"


def test_the_override_makes_the_bot_publish_over_websocket_by_container_name() -> None:
    bot = services("websocket")["ai-trading-bot"]
    with pytest.MonkeyPatch.context() as patch:
        clean_environment(patch, environment_of(bot))
        settings = PublisherSettings.from_env()
    assert settings.enabled
    assert settings.url == "ws://dashboard-backend:8000/ws"
    assert settings.transport == "ws"
    base_bot = services("base")["ai-trading-bot"]
    with pytest.MonkeyPatch.context() as patch:
        clean_environment(patch, environment_of(base_bot))
        assert PublisherSettings.from_env().transport == "zmq"


def test_the_override_trusts_the_bot_by_its_token_not_its_address() -> None:
    stack = services("websocket")
    with pytest.MonkeyPatch.context() as patch:
        clean_environment(patch, environment_of(stack["ai-trading-bot"]))
        bot = PublisherSettings.from_env()
        clean_environment(patch, environment_of(stack["dashboard-backend"]))
        config = config_from_args(parse(command_of(stack["dashboard-backend"])))
    assert not config.publish_networks, "no address may publish without a credential"
    assert "ipv4_address" not in str(stack["ai-trading-bot"].get("networks"))
    auth = Authenticator(config.tokens, config.publish_token_sources(), config.jwt_secret)
    now = 1_700_000_000.0
    grant = auth.authenticate(bot.token, now)
    assert grant.publish, "the bot's token may publish"
    assert grant.sources == (bot.source_id,), "as the bot's own source id only"
    # the tester and check_stack.sh watch with the viewers' token, which cannot publish
    tester_token = environment_of(stack["websocket-tester"])["TRADEBUS_TOKEN"]
    viewer = auth.authenticate(tester_token, now)
    assert not viewer.publish
    assert environment_of(stack["dashboard-backend"])["VIEW_TOKEN"] == tester_token
    with pytest.raises(AuthError):
        auth.authenticate(None, now)  # a browser without a token may not even watch


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_other_containers_reach_the_bridge_by_its_service_name(stack: str) -> None:
    backend = services(stack)["dashboard-backend"]
    with pytest.MonkeyPatch.context() as patch:
        clean_environment(patch, environment_of(backend))
        config = config_from_args(parse(command_of(backend)))
    hosts = HostPolicy.from_settings(config.host, config.server_names)
    assert hosts.allows("dashboard-backend:8000", 8000), "tap --docker-url, the guide's bot"
    assert hosts.allows("localhost:8000", 8000), "the dashboard from the host"


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_ports_are_published_on_the_hosts_loopback_only(stack: str) -> None:
    published: dict[str, set[int]] = {}
    for name, service in all_services(stack).items():
        for mapping in service.get("ports", []):
            host, host_port, container_port = str(mapping).split(":")
            assert host == "127.0.0.1", f"{stack}/{name} publishes {mapping} beyond loopback"
            assert host_port == container_port, f"{name}: the documented port on the host too"
            published.setdefault(name, set()).add(int(host_port))
    # the dashboard, and the bus for bus.Subscriber, tradebus record/replay and host bots
    expected = {"dashboard-backend": {8000}, "bus-proxy": {5555, 5556, 5557}}
    if stack == "scale":  # browsers reach the bridges through the load balancer
        expected["load-balancer"] = {8000}
    assert published == expected


def test_nothing_depends_on_a_fixed_subnet() -> None:
    for stack in STACKS:
        network = STACKS[stack]["networks"]["trading-network"]
        assert network["name"] == "trading-network", "the guide's name"
        assert "ipam" not in network, "a fixed range can collide with a left-over network"
        for name, service in services(stack).items():
            assert "ipv4_address" not in str(service.get("networks")), f"{stack}/{name}"


def test_every_service_reads_the_guides_env_file_if_there_is_one() -> None:
    for name, service in services("base").items():
        assert service.get("env_file") == [{"path": ".env", "required": False}], name
    root = COMPOSE.parent
    assert ".env" in (root / ".gitignore").read_text().split()
    # never sent to the image build: it holds the operator's secrets
    assert "**/.env" in (root / ".dockerignore").read_text().split()


def test_the_base_image_is_pinned_by_version() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-bookworm)?", base.group(1)), base.group(1)


def test_the_image_holds_every_package_the_project_installs() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    pyproject = tomllib.loads((COMPOSE.parent / "pyproject.toml").read_text())
    packages = {name.partition(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, re.MULTILINE))
    assert packages <= copied, sorted(packages - copied)


def test_ci_runs_the_compose_stack_for_real_after_the_tests() -> None:
    root = COMPOSE.parent
    run = (root / ".ci" / "run").read_text()
    commands = [line.strip() for line in run.splitlines() if line.strip().startswith("make ")]
    assert commands[0] == "make test", commands
    assert commands[-1] == "make test-compose", commands
    makefile = (root / "Makefile").read_text()
    assert re.search(r"^test-compose:.*\n\tbash compose/ci/test-compose.sh$", makefile, re.M)
    script = COMPOSE / "ci" / "test-compose.sh"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    text = script.read_text()
    # the stack is built from compose/Dockerfile as it is, with the base it names
    assert "compose/Dockerfile" in text
    assert "docker-compose.websocket.yml" in text
    assert "docker-compose.second-bot.yml" in text


# -- CURVE keys: made once by the one-shot service, each service mounts only its own -----------
KEYS_SCRIPT = COMPOSE / "keys.sh"
BOT_SOURCE = "ai-trading-bot"


def bots_of(stack: str) -> dict[str, str]:
    """Service -> source id, for each service that publishes straight onto the bus."""
    return {
        name: environment_of(service)["SYSTEM__TRADEBUS_SOURCE_ID"]
        for name, service in services(stack).items()
        if "SYSTEM__TRADEBUS_SOURCE_ID" in environment_of(service)
    }


def expected_key_files(stack: str) -> dict[str, set[str]]:
    bots = bots_of(stack)
    expected = {
        "bus-proxy": {"proxy.key", "proxy.key_secret", "bridge.key"}
        | {f"{source}.key" for source in bots.values()},
    }
    for name, service in services(stack).items():
        if command_of(service)[0] == "bridge":  # the scale variant's bridges share one key
            expected[name] = {"bridge.key", "bridge.key_secret", "proxy.key"}
    for name, source in bots.items():
        expected[name] = {f"{source}.key", f"{source}.key_secret", "proxy.key"}
    return expected


def volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Named volume -> (mount point, read-only), from the short ``VOLUME:PATH[:ro]`` form."""
    mounts = {}
    for entry in service.get("volumes", []):
        volume, target, *mode = str(entry).split(":")
        mounts[volume] = (target, mode == ["ro"])
    return mounts


def run_keys_script(root: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """compose/keys.sh as the keys service runs it, on ``root`` instead of /keys."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COMPOSE_KEYS_ROOT": str(root),
        "COMPOSE_KEYS_OWNER": "",  # the image's user tradebus does not exist here
    }
    return subprocess.run(
        ["sh", str(KEYS_SCRIPT), *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )


def fill_keys(stack: str, root: Path) -> Path:
    """The keys service's mounts as directories, filled by one real run of compose/keys.sh."""
    for target, _ in volume_mounts(all_services(stack)[KEYS_SERVICE]).values():
        (root / Path(target).relative_to("/keys")).mkdir(parents=True)
    result = run_keys_script(root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


@pytest.fixture
def keys_root(tmp_path: Path) -> Path:
    return fill_keys("base", tmp_path / "keys")


def test_the_keys_service_is_a_one_shot_script_the_image_carries() -> None:
    keys = all_services("base")[KEYS_SERVICE]
    assert keys["entrypoint"] == ["compose-keys"]
    assert "command" not in keys
    assert keys["restart"] == "no", "it runs once per up, then stays exited"
    assert keys["user"] == "root", "it writes fresh volumes and hands the files to tradebus"
    assert (
        "COPY compose/keys.sh /usr/local/bin/compose-keys" in (COMPOSE / "Dockerfile").read_text()
    )
    assert os.access(KEYS_SCRIPT, os.X_OK)
    syntax = subprocess.run(["sh", "-n", str(KEYS_SCRIPT)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    mounts = volume_mounts(keys)
    assert mounts["keys-store"] == ("/keys/store", False)
    assert set(mounts) == set(STACKS["base"]["volumes"]), "it fills every key volume"


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_each_service_mounts_only_its_own_keys(stack: str, tmp_path: Path) -> None:
    keys_root = fill_keys(stack, tmp_path / "keys")
    made_by = volume_mounts(all_services(stack)[KEYS_SERVICE])
    expected = expected_key_files(stack)
    for name, service in services(stack).items():
        mounts = volume_mounts(service)
        if name not in expected:
            assert not mounts, f"{name} speaks WebSocket: it needs no key"
            continue
        assert len(mounts) == 1, f"{name} mounts {sorted(mounts)}"
        [(volume, (target, read_only))] = mounts.items()
        assert (target, read_only) == ("/keys", True), f"{name}: {volume} at {target}"
        assert volume != "keys-store", f"{name} must not see the key store"
        held = keys_root / Path(made_by[volume][0]).relative_to("/keys")
        assert {f.name for f in held.iterdir()} == expected[name], name
        for secret in held.glob("*.key_secret"):
            assert secret.stat().st_mode & 0o077 == 0, f"{secret.name} is readable by others"
    assert set(volume_mounts(all_services(stack)[KEYS_SERVICE])) == set(STACKS[stack]["volumes"])


def test_each_service_reads_its_keys_from_its_mount(keys_root: Path) -> None:
    from bus.keys import load_client_keys, load_server_keys

    base = services("base")
    assert environment_of(base["bus-proxy"])["TRADEBUS__PROXY_KEYS"] == "/keys"
    assert environment_of(base["dashboard-backend"])["TRADEBUS__BRIDGE_KEYS"] == "/keys"
    assert "--keys=/keys" in command_of(base["ai-trading-bot"])
    # the websocket override's bot publishes to the bridge with a token: no keys
    assert not any("--keys" in part for part in command_of(services("websocket")["ai-trading-bot"]))
    server = load_server_keys(keys_root / "proxy")
    admitted = {info.name: info.sources for info in server.authorized.values()}
    source_id = environment_of(base["ai-trading-bot"])["SYSTEM__TRADEBUS_SOURCE_ID"]
    assert admitted == {"bridge": frozenset(), BOT_SOURCE: frozenset({source_id})}
    for client in (keys_root / "bridge", keys_root / "bot" / BOT_SOURCE):
        assert load_client_keys(client).server_public_key == server.public_key


def test_keys_are_made_once_rotated_on_request_and_added_from_elsewhere(keys_root: Path) -> None:
    bot_dir = keys_root / "bot" / BOT_SOURCE
    first = (bot_dir / f"{BOT_SOURCE}.key").read_text()
    proxy_first = (keys_root / "proxy" / "proxy.key").read_text()
    again = run_keys_script(keys_root)
    assert again.returncode == 0, again.stderr
    assert (bot_dir / f"{BOT_SOURCE}.key").read_text() == first, "a second up keeps every key"
    rotated = run_keys_script(keys_root, "--rotate", BOT_SOURCE)
    assert rotated.returncode == 0, rotated.stderr
    new = (bot_dir / f"{BOT_SOURCE}.key").read_text()
    assert new != first
    assert (keys_root / "proxy" / f"{BOT_SOURCE}.key").read_text() == new
    assert (keys_root / "proxy" / "proxy.key").read_text() == proxy_first
    assert [
        p.read_text() for p in (keys_root / "store" / "retired").glob(f"*/{BOT_SOURCE}.key")
    ] == [first]
    # a program on another host: its public key, mounted under /keys/add, is admitted
    elsewhere = keys_root.parent / "analytics-host"
    from bus.keys import create_key

    create_key(elsewhere, "analytics")
    (keys_root / "add").mkdir()
    (keys_root / "add" / "analytics.key").write_text((elsewhere / "analytics.key").read_text())
    added = run_keys_script(keys_root)
    assert added.returncode == 0, added.stderr
    assert (keys_root / "proxy" / "analytics.key").exists()
    assert not (keys_root / "proxy" / "analytics.key_secret").exists()
    # a key named like one of the stack's would replace it: refused
    (keys_root / "add" / f"{BOT_SOURCE}.key").write_text(new)
    clash = run_keys_script(keys_root)
    assert clash.returncode != 0
    assert "refusing" in clash.stdout
