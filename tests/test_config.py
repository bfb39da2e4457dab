from pathlib import Path

import pytest

from stitchwork.config import load_config
from stitchwork.errors import ConfigError


def test_defaults_then_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('state_dir = "/tmp/sw"\n[security]\ntoken_ttl_s = 120\n[isolation]\ndefault = "inline://"\n')
    config = load_config(path, environ={"STITCHWORK_SECURITY__TOKEN_TTL_S": "60", "STITCHWORK_TOOL_DIRS": "a,b"})
    assert config.state_dir == Path("/tmp/sw")
    assert config.security.token_ttl_s == 60
    assert config.isolation.default == "inline://"
    assert config.tool_dirs == ("a", "b")
    assert config.store_uri == "duckdb:///tmp/sw/stitchwork.duckdb"
    assert config.vault_uri == "vault+file:///tmp/sw/vault.enc"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(environ={"STITCHWORK_STATE_DIR": str(tmp_path)})
    with pytest.raises(AttributeError):
        config.state_dir = Path("/")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[security]\nnope = 1\n", {}, "{file}: [security] nope: unknown key; known: approval_timeout_s,"),
        ("[security]\ntoken_tl_s = 1\n", {}, "{file}: [security] token_tl_s: unknown key (did you mean token_ttl_s?)"),
        ("[security]\na = 1\nb = 2\n", {}, "{file}: [security]: unknown keys a, b; known:"),
        ("[security]\ntoken_ttl_s = 'soon'\n", {}, "{file}: [security] token_ttl_s: expected int, got 'soon'"),
        ("[data.retention]\nruns_days = 'x'\n", {}, "{file}: [data.retention] runs_days: expected float, got 'x'"),
        ("tool_dirs = 3\n", {}, "{file}: tool_dirs: expected a list, got 3"),
        ("security = 3\n", {}, "{file}: [security]: expected a table, got 3"),
        ("bogus = 1\n", {}, "{file}: bogus: unknown key; known: a2a, agent_dirs,"),
        ("state_dir = \n", {}, "{file}: Invalid value (at line 1"),
        ("", {"STITCHWORK_SECURITY__BUILTIN_POLICIES": "maybe"},
         "environment STITCHWORK_SECURITY__BUILTIN_POLICIES ([security] builtin_policies): expected true or false, "
         "got 'maybe'"),
        ("", {"STITCHWORK_DATA__RETENTION__RUNS_DAYS": "x"},
         "environment STITCHWORK_DATA__RETENTION__RUNS_DAYS ([data.retention] runs_days): expected float, got 'x'"),
        ("", {"STITCHWORK_SECURITY__TOKN": "1"},
         "environment STITCHWORK_SECURITY__TOKN ([security] tokn): unknown key; known:"),
        ("", {"STITCHWORK_NOPE__X": "1"}, "environment STITCHWORK_NOPE__X: unknown section 'nope'"),
        # the environment wins over the file, and the error names the one that gave the bad value
        ("[security]\ntoken_ttl_s = 5\n", {"STITCHWORK_SECURITY__TOKEN_TTL_S": "soon"},
         "environment STITCHWORK_SECURITY__TOKEN_TTL_S ([security] token_ttl_s): expected int, got 'soon'"),
        ("[security]\ntoken_ttl_s = 'soon'\n", {"STITCHWORK_SECURITY__AUDIENCE": "x"},
         "{file}: [security] token_ttl_s: expected int, got 'soon'"),
    ],
)
def test_bad_config_names_the_file_or_variable_and_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                                           message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=env)
    assert str(caught.value).startswith(message.format(file=f"config file {path}")), str(caught.value)


def test_the_default_config_file_is_named_too(tmp_path: Path) -> None:
    (tmp_path / "stitchwork.toml").write_text("[server]\nport = 'high'\n")
    with pytest.raises(ConfigError, match=rf"^config file {tmp_path / 'stitchwork.toml'}: \[server\] port: "):
        load_config(environ={"STITCHWORK_STATE_DIR": str(tmp_path)})


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})


def test_every_stitchwork_variable_the_code_reads_is_a_config_key(tmp_path: Path) -> None:
    from stitchwork.config import load_config

    env = {"STITCHWORK_STATE_DIR": str(tmp_path), "STITCHWORK_BUS": "nats://127.0.0.1:4333",
           "STITCHWORK_NATS_SERVER": "/opt/nats-server"}
    config = load_config(environ=env)
    assert (config.messaging.bus, config.messaging.nats_server) == ("nats://127.0.0.1:4333", "/opt/nats-server")
    both = load_config(environ={**env, "STITCHWORK_MESSAGING__BUS": "nats://10.0.0.1:4222"})
    assert both.messaging.bus == "nats://10.0.0.1:4222"  # the long form wins
