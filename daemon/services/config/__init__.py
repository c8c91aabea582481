"""The daemon's configuration: a TOML file checked by pydantic, or the embedded default.

Every problem in a file is reported at once, each with the file, the key, the
value found and what to write instead (Klipper's habit: the operator fixes the
file in one pass, not one error per restart). Relative paths in a file are
relative to the file's directory.

With no file, pbmd runs the embedded development default (`DEFAULT_TOML`): a
simulated four-port controller in the daemon's own process, its state under
the user's state directory, and the shipped protocols, which are signed with
the pbmd TEST key and are NOT FOR CLINICAL USE.

Paths that follow the environment (state directory, control socket) are
resolved here once, for the daemon and for pbmctl alike.

Where each part lives:

- ``model``: the sections (controllers, api, protocols, records, engine,
  calibration, logging) and the whole ``Config``;
- ``checks``: checks across sections, and pydantic's errors said as fixes;
- ``issues``: ConfigIssue and ConfigError, what the operator reads;
- ``loading``: the embedded default, parse/validate/load, command-line overrides;
- ``paths``: the state directory and control socket the environment implies;
- ``render``: the effective configuration as TOML (`pbmd config show`).

The ``[mqtt]`` section's model lives with the publisher
(``pbmd.daemon.services.mqtt.config``); ``mqtt_config_model`` finds it.
"""

from pbmd.daemon.services.config.checks import _unwrap_model
from pbmd.daemon.services.config.clinic_db import ClinicDbConfig
from pbmd.daemon.services.config.issues import ConfigError, ConfigIssue, toml_value
from pbmd.daemon.services.config.loading import (
    DEFAULT_SOURCE,
    DEFAULT_TOML,
    check_trusted_keys,
    load,
    mqtt_config_model,
    parse,
    validate,
    with_overrides,
)
from pbmd.daemon.services.config.model import (
    MAX_LOGICAL_PORTS,
    ApiConfig,
    CalibrationConfig,
    Config,
    ControllerConfig,
    CoursesConfig,
    EngineConfig,
    FsPath,
    LoggingConfig,
    ProtocolsConfig,
    RecordsConfig,
    SimOptions,
    check_key_file,
    check_link,
)
from pbmd.daemon.services.config.paths import (
    MAX_SOCKET_PATH_BYTES,
    SOCKET_NAME,
    SYSTEM_CONFIG,
    SYSTEM_SOCKET,
    SYSTEM_STATE_DIR,
    SYSTEM_USER,
    client_socket_candidates,
    default_socket_path,
    default_state_dir,
)
from pbmd.daemon.services.config.render import render_toml

__all__ = [
    "DEFAULT_SOURCE",
    "DEFAULT_TOML",
    "MAX_LOGICAL_PORTS",
    "MAX_SOCKET_PATH_BYTES",
    "SOCKET_NAME",
    "SYSTEM_CONFIG",
    "SYSTEM_SOCKET",
    "SYSTEM_STATE_DIR",
    "SYSTEM_USER",
    "ApiConfig",
    "CalibrationConfig",
    "ClinicDbConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "ControllerConfig",
    "CoursesConfig",
    "EngineConfig",
    "FsPath",
    "LoggingConfig",
    "ProtocolsConfig",
    "RecordsConfig",
    "SimOptions",
    "_unwrap_model",
    "check_key_file",
    "check_link",
    "check_trusted_keys",
    "client_socket_candidates",
    "default_socket_path",
    "default_state_dir",
    "load",
    "mqtt_config_model",
    "parse",
    "render_toml",
    "toml_value",
    "validate",
    "with_overrides",
]
