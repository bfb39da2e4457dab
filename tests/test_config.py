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
        ("[security]\nnope = 1\n", {}, "unknown key(s) nope"),
        ("[security]\ntoken_ttl_s = 'soon'\n", {}, "expected int"),
        ("state_dir = \n", {}, "config file"),
        ("", {"STITCHWORK_SECURITY__BUILTIN_POLICIES": "maybe"}, "expected true or false"),
        ("", {"STITCHWORK_NOPE__X": "1"}, "unknown section 'nope'"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path, environ=env)


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
