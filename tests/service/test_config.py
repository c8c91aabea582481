"""Configuration: every error names the file, the key, the value and the fix, all at once."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pbmd.daemon.services import config as cfg

from .harness import PBMD

MINIMAL = '[[controllers]]\nname = "main"\nlink = "sim"\n'


def issues(text: str, tmp_path: Path | None = None) -> list[cfg.ConfigIssue]:
    base = tmp_path if tmp_path is not None else Path("/nonexistent")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(text, "test.toml", base=base)
    assert info.value.source == "test.toml"
    return list(info.value.issues)


def one(text: str, key: str, tmp_path: Path | None = None) -> cfg.ConfigIssue:
    found = [i for i in issues(text, tmp_path) if i.key == key]
    assert found, f"no issue for {key}"
    return found[0]


# (extra TOML after a minimal valid file, key, words in the problem, words in the fix)
CASES = [
    ('colour = "blue"\n', "colour", "unknown key", "remove it"),
    ("[api]\nsocket_mod = 1\n", "api.socket_mod", "unknown key", 'did you mean "socket_mode"'),
    ("state_dir = 5\n", "state_dir", "wrong type", "a path in quotes"),
    ('device_id = "a b"\n', "device_id", "wrong form", "matching"),
    ("[api]\nmax_clients = 0\n", "api.max_clients", "at least 1", "at least 1"),
    ('[api]\nmax_clients = "many"\n', "api.max_clients", "wrong type", "an integer"),
    ("[api]\nwatch_interval_s = 100.0\n", "api.watch_interval_s", "at most 10", "at most 10"),
    ('[api]\nsocket_mode = "rw"\n', "api.socket_mode", "wrong form", "matching"),
    ('[api]\nclinician_group = ""\n', "api.clinician_group", "at least 1", "configuration.md"),
    ("[engine]\ntelemetry_hz = 1000\n", "engine.telemetry_hz", "at most 200", "at most 200"),
    ("[records]\nsync_interval_s = 0\n", "records.sync_interval_s", "above 0", "above 0"),
    (
        "[limits]\nfluence_ceiling_j_cm2 = 50.0\n",
        "limits.fluence_ceiling_j_cm2",
        "at most 20",
        "at most 20",
    ),
    (
        "[limits]\nstep_time_min_s = 100.0\nstep_time_max_s = 10.0\n",
        "limits",
        "step_time_min_s is above step_time_max_s",
        "configuration.md",
    ),
    ('[calibration]\ndue = "2025-01-01"\n', "calibration.due", "wrong type", "a TOML date"),
    ('[logging]\nlevel = "verbose"\n', "logging.level", "not an accepted value", "'debug'"),
    ('[logging]\nformat = "xml"\n', "logging.format", "not an accepted value", "'json'"),
    (
        "[protocols]\npreload_shipped = true\n",
        "protocols.preload_shipped",
        "TEST key",
        "trust_test_key = true",
    ),
    (
        '[protocols]\ntrusted_keys = ["missing.pub"]\n',
        "protocols.trusted_keys",
        "no such file",
        "minisign public key",
    ),
    ('[ports]\n1 = "mian:1"\n', "ports.1", "no controller is named 'mian'", "main"),
    ('[ports]\n1 = "main"\n', "ports.1", "not a controller port", "CONTROLLER:PORT"),
    ('[ports]\nx = "main:1"\n', "ports.x", "not a logical port", "1..8"),
    ('[ports]\n1 = "main:9"\n', "ports.1", "device port 9 does not exist", "1..8"),
    (
        '[ports]\n1 = "main:1"\n2 = "main:1"\n',
        "ports.2",
        "already logical port 1",
        "one logical port",
    ),
]


@pytest.mark.parametrize(("extra", "key", "problem", "fix"), CASES)
def test_each_error_names_key_value_problem_and_fix(
    extra: str, key: str, problem: str, fix: str, tmp_path: Path
) -> None:
    issue = one(extra + MINIMAL, key, tmp_path)
    assert problem in issue.problem
    assert fix in issue.fix
    text = issue.render()
    assert text.startswith(f"{key} = ")
    assert "fix: " in text


CONTROLLER_CASES = [
    ('name = "Main Ctl"\nlink = "sim"\n', "controllers[1].name", "not a controller name"),
    ('name = "m"\nlink = "usb://1209:1"\n', "controllers[1].link", "not a USB URL"),
    ('name = "m"\nlink = "usb://1209:0001?backend=sim"\n', "controllers[1].link", "not a USB URL"),
    ('name = "m"\nlink = "socket://host"\n', "controllers[1].link", "not a socket URL"),
    ('name = "m"\nlink = "socket://h:99999"\n', "controllers[1].link", "not a socket URL"),
    ('name = "m"\nlink = "ttyUSB0"\n', "controllers[1].link", "not a controller link"),
    (
        'name = "m"\nlink = "/dev/ttyACM0"\n[controllers.sim]\n',
        "controllers[1]",
        "simulator options given",
    ),
    (
        'name = "m"\nlink = "sim"\n[controllers.sim]\ntime_scale = 500.0\n',
        "controllers[1].sim.time_scale",
        "at most 120",
    ),
    (
        'name = "m"\nlink = "sim"\n[controllers.sim]\nports = { 9 = "duo_pad" }\n',
        "controllers[1].sim.ports",
        "not a port number",
    ),
    (
        'name = "m"\nlink = "sim"\n[controllers.sim]\nports = { 1 = "laser" }\n',
        "controllers[1].sim.ports",
        "not a simulated applicator",
    ),
    (
        'name = "m"\nlink = "sim"\n[controllers.sim]\ntransport = "usb2"\n',
        "controllers[1].sim.transport",
        "not an accepted value",
    ),
    (
        'name = "m"\nlink = "sim"\n[controllers.sim]\ncontrol = "nowhere"\n',
        "controllers[1].sim.control",
        "not HOST:PORT",
    ),
    ('link = "sim"\n', "controllers[1].name", "required key is missing"),
]


@pytest.mark.parametrize(("body", "key", "problem"), CONTROLLER_CASES)
def test_controller_errors(body: str, key: str, problem: str) -> None:
    issue = one("[[controllers]]\n" + body, key)
    assert problem in issue.problem
    assert issue.fix


def test_malformed_usb_link_shows_the_usb_forms() -> None:
    issue = one('[[controllers]]\nname = "m"\nlink = "usb://controller"\n', "controllers[1].link")
    assert "usb://VID:PID/SERIAL" in issue.fix and 'transport = "usb"' in issue.fix
    assert issue.value == "usb://controller"


@pytest.mark.parametrize("link", ["usb://1209:0001", "usb://cafe:BEEF/PBM-0042"])
def test_usb_links_are_accepted(link: str) -> None:
    config = cfg.parse(f'[[controllers]]\nname = "m"\nlink = "{link}"\n')
    assert config.controllers[0].link == link
    test_id = [line for line in config.development if "1209:0001" in line]
    assert bool(test_id) == link.startswith("usb://1209:0001")


def test_simulator_over_usb_is_an_option() -> None:
    config = cfg.parse(MINIMAL + '[controllers.sim]\ntransport = "usb"\n')
    assert config.controllers[0].sim_options.transport == "usb"


def test_controllers_required_and_map_needed_for_two() -> None:
    assert one("", "controllers").missing
    two = '[[controllers]]\nname = "a"\nlink = "sim"\n[[controllers]]\nname = "b"\nlink = "sim"\n'
    assert "logical port map is required" in one(two, "ports").problem
    dup = '[[controllers]]\nname = "a"\nlink = "sim"\n[[controllers]]\nname = "a"\nlink = "sim"\n'
    assert (
        "two controllers have this name"
        in one('[ports]\n1 = "a:1"\n' + dup, "controllers[2].name").problem
    )


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        'colour = "blue"\n[[controllers]]\nname = "Main"\nlink = "usb://x"\n'
        "[api]\nmax_clients = 0\n[logging]\nlevel = 3\n"
        '[ports]\n1 = "nope:1"\n[protocols]\npreload_shipped = true\n'
    )
    found = {i.key for i in issues(text, tmp_path)}
    assert found >= {
        "colour",
        "controllers[1].name",
        "controllers[1].link",
        "api.max_clients",
        "logging.level",
        "ports.1",
        "protocols.preload_shipped",
    }
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(text, "/etc/pbmd/pbmd.toml")
    rendered = info.value.render()
    assert rendered.startswith("/etc/pbmd/pbmd.toml: ")
    assert f"{len(info.value.issues)} configuration errors" in rendered


def test_toml_syntax_error_names_the_line_column_and_what_is_wrong() -> None:
    issue = one('[[controllers]]\nname = "m\nlink = "sim"\n', "(file)")
    assert issue.problem.startswith("line 2, column 10: not valid TOML: a line ends inside a")
    assert "correct line 2" in issue.fix
    rendered = issue.render()
    assert "(missing)" not in rendered and "(file)" not in rendered
    # The line itself, and a caret under the column.
    assert '2 | name = "m\n' in rendered
    assert rendered.splitlines()[2].index("^") == rendered.splitlines()[1].index('"m') + 2
    unclosed = one("[[controllers]]\nname = [1, 2\n", "(file)")
    assert unclosed.problem.startswith("line 3, column 1: not valid TOML") or (
        unclosed.problem.startswith("at the end of the file: not valid TOML")
    )


@pytest.mark.parametrize(
    ("key", "text", "fix"),
    [
        ("engine.telemetry_hz", '[engine]\ntelemetry_hz = "fast"\n', "from 10 to 200, e.g. 50"),
        ("api.max_clients", '[api]\nmax_clients = "many"\n', "from 1 to 4096, e.g. 256"),
        ("records.sync_interval_s", '[records]\nsync_interval_s = "x"\n', "e.g. 1.0"),
    ],
)
def test_a_wrong_type_is_answered_with_a_value_in_range(key: str, text: str, fix: str) -> None:
    """`telemetry_hz = "fast"` once suggested 5, which the range 10..200 refuses."""
    issue = one(MINIMAL + text, key)
    assert fix in issue.fix, issue.fix
    # The example given is itself accepted.
    example = issue.fix.rsplit("e.g. ", 1)[1]
    good = MINIMAL + text.replace(text.split("= ", 1)[1].strip(), example)
    assert cfg.parse(good, "test.toml") is not None


def test_an_invalid_controller_name_is_never_offered_as_the_fix() -> None:
    text = (
        '[[controllers]]\nname = "Main"\nlink = "sim"\n'
        '[[controllers]]\nname = "left"\nlink = "sim"\n'
        '[ports]\n1 = "main:1"\n2 = "left:1"\n'
    )
    issue = one(text, "ports.1")
    assert "Main" not in issue.problem + issue.fix
    assert issue.fix == "use one of the [[controllers]] names: left"
    assert [i.key for i in issues(text)].count("controllers[1].name") == 1
    alone = text.replace('name = "left"', 'name = "Left"').replace('"left:1"', '"Left:1"')
    fix = one(alone, "ports.1").fix
    assert "Main" not in fix and "Left" not in fix and "correct the [[controllers]] names" in fix


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(tmp_path / "absent.toml")
    assert "no such file" in info.value.issues[0].problem
    assert "embedded development default" in info.value.issues[0].fix
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(binary)
    assert "cannot read it" in info.value.issues[0].problem


def test_key_file_that_is_not_a_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    issue = one(
        '[protocols]\ntrusted_keys = ["bad.pub"]\n' + MINIMAL, "protocols.trusted_keys", tmp_path
    )
    assert "not a minisign public key" in issue.problem


def test_relative_paths_follow_the_file(tmp_path: Path) -> None:
    from pbmd.protocols.library import TEST_KEY_FILE

    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k.pub").write_bytes(TEST_KEY_FILE.read_bytes())
    path = tmp_path / "pbmd.toml"
    path.write_text(
        'state_dir = "state"\n'
        + MINIMAL
        + '[api]\nsocket = "run/c.sock"\n[protocols]\ntrusted_keys = ["keys/k.pub"]\n'
    )
    config, source = cfg.load(path)
    assert source == str(path)
    assert config.resolved_state_dir == tmp_path / "state"
    assert config.socket_path == tmp_path / "run" / "c.sock"
    assert config.protocols.trusted_keys == [tmp_path / "keys" / "k.pub"]
    assert [k.id_hex for k in cfg.check_trusted_keys(config)] == ["42E43555FA8591F9"]


def test_socket_path_too_long(tmp_path: Path) -> None:
    long_dir = "/tmp/" + "x" * 120
    issue = one(f'[api]\nsocket = "{long_dir}/c.sock"\n' + MINIMAL, "api.socket")
    assert "Unix sockets allow 107" in issue.problem


def test_mqtt_table_is_validated_by_the_publisher_model() -> None:
    model = cfg.mqtt_config_model()
    if model is None:
        config = cfg.parse('[mqtt]\nanything = "goes"\n' + MINIMAL)
        assert config.mqtt == {"anything": "goes"}
        return
    issue = one("[mqtt]\nport = 0\n" + MINIMAL, "mqtt.port")
    assert "at least 1" in issue.problem
    assert one("[mqtt]\nhots = 1\n" + MINIMAL, "mqtt.hots").problem == "unknown key"


def test_embedded_default_and_round_trip() -> None:
    config, source = cfg.load(None)
    assert source == cfg.DEFAULT_SOURCE
    assert config.controllers[0].link == "sim"
    assert config.protocols.trust_test_key and config.protocols.preload_shipped
    assert any("NOT FOR CLINICAL USE" in line for line in config.development)
    again = cfg.parse(cfg.render_toml(config))
    assert again.model_dump() == cfg.parse(cfg.render_toml(again)).model_dump()
    assert again.resolved_state_dir == config.resolved_state_dir
    dated = cfg.parse("[calibration]\ndue = 2030-01-31\n" + MINIMAL)
    assert cfg.parse(cfg.render_toml(dated)).calibration.due == dt.date(2030, 1, 31)


def test_overrides_are_checked_like_the_file() -> None:
    config, source = cfg.load(None)
    fast = cfg.with_overrides(config, source, sim_time_scale=60.0, state_dir=Path("/tmp/x"))
    assert fast.controllers[0].sim_options.time_scale == 60.0
    assert fast.resolved_state_dir == Path("/tmp/x")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.with_overrides(config, source, sim_time_scale=500.0)
    assert info.value.issues[0].key == "--sim-time-scale"
    real = cfg.parse('[[controllers]]\nname = "m"\nlink = "socket://127.0.0.1:7000"\n')
    with pytest.raises(cfg.ConfigError) as info:
        cfg.with_overrides(real, "x", sim_time_scale=2.0)
    assert "no controller of this configuration is simulated" in info.value.issues[0].problem


def test_default_paths_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert cfg.default_state_dir() == Path("/home/someone/.local/state/pbmd")
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg/state")
    assert cfg.default_state_dir() == Path("/xdg/state/pbmd")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/pbmd")
    assert cfg.default_state_dir() == Path("/var/lib/pbmd")
    state = Path("/var/lib/pbmd")
    assert cfg.default_socket_path(state) == state / "control.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert cfg.default_socket_path(state) == Path("/run/user/1000/pbmd/control.sock")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/pbmd")
    assert cfg.default_socket_path(state) == Path("/run/pbmd/control.sock")
    monkeypatch.setenv("PBMD_SOCKET", "/elsewhere.sock")
    assert cfg.client_socket_candidates()[0] == Path("/elsewhere.sock")


def test_pbmd_config_commands(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    default = subprocess.run(
        [*PBMD, "config", "default"], capture_output=True, text=True, timeout=60, env=env
    )
    assert default.returncode == 0 and 'link = "sim"' in default.stdout
    good = tmp_path / "good.toml"
    good.write_text(default.stdout)
    check = subprocess.run(
        [*PBMD, "config", "check", "--config", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert check.returncode == 0 and "OK" in check.stdout and "NOT FOR CLINICAL USE" in check.stdout
    # The file as a positional argument, as `pbmd config check /etc/pbmd/pbmd.toml`.
    positional = subprocess.run(
        [*PBMD, "config", "check", str(good)], capture_output=True, text=True, timeout=60, env=env
    )
    assert positional.returncode == 0 and f"{good}: OK" in positional.stdout
    two = subprocess.run(
        [*PBMD, "config", "check", str(good), "--config", str(tmp_path / "other.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert two.returncode == 2 and "two files given" in two.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text('[[controllers]]\nname = "main\n')
    syntax = subprocess.run(
        [*PBMD, "config", "check", str(broken)], capture_output=True, text=True, timeout=60, env=env
    )
    assert syntax.returncode == 78
    assert "line 2, column 13: not valid TOML" in syntax.stderr
    assert "(file) = (missing)" not in syntax.stderr
    show = subprocess.run(
        [*PBMD, "config", "show", "--config", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert show.returncode == 0 and "[api]" in show.stdout
    assert cfg.parse(show.stdout.split("\n", 1)[1]).api.max_clients == 256


def _keys(model: type[Any], prefix: str = "") -> list[str]:
    """How the docs must spell each key: `key` for a value, [table] for a table."""
    out = []
    for name, field in model.model_fields.items():
        sub = cfg._unwrap_model(field.annotation)
        if sub is None and name != "mqtt":
            out.append(f"`{name}`")
            continue
        out.append(f"[{prefix}{name}]")
        if sub is not None and name != "limits":
            out += _keys(sub, f"{prefix}{name}.")
    return out


def test_every_key_is_documented() -> None:
    text = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    missing = [k for k in _keys(cfg.Config) if k not in text]
    assert not missing, f"docs/configuration.md does not describe {missing}"


def test_the_clinic_example_parses(tmp_path: Path) -> None:
    from pbmd.protocols.library import TEST_KEY_FILE

    example = Path(__file__).parents[2] / "systemd" / "pbmd.example.toml"
    key = tmp_path / "clinic.pub"
    key.write_bytes(TEST_KEY_FILE.read_bytes())
    text = example.read_text().replace("/etc/pbmd/keys/clinic.pub", str(key))
    config = cfg.parse(text, str(example))
    assert config.controllers[0].link.startswith("/dev/serial/by-id/")
    assert config.development == []
