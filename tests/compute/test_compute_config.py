"""The [compute] section: TOML tables for deployments, fallbacks and per-agent limits; environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from stitchwork.compute.router import RouterSettings, parse_deployments
from stitchwork.config import ComputeConfig, load_config
from stitchwork.errors import ConfigError
from stitchwork.gateway.models import _agent_limits

TOML = '''
[compute]
strategy = "cost"
record_text = true
[[compute.deployments]]
model = "llama"
uri = "openai+https://gpu.example/v1?profile=vllm&model=meta-llama/Llama-3.1-8B-Instruct&key=secret://gpu"
cost_in = 0.1
[[compute.deployments]]
model = "llama"
uri = "runpod://abc123?key=secret://runpod"
[compute.fallbacks]
llama = ["llama"]
[compute.agents."*"]
models = ["llama"]
max_tokens = 1000
'''


def test_compute_section_loads_from_toml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "stitchwork.toml"
    path.write_text(TOML)
    config = load_config(path, environ={"STITCHWORK_COMPUTE__STRATEGY": "latency"})
    compute = config.compute
    assert (compute.strategy, compute.record_text) == ("latency", True)
    deployments = parse_deployments(compute.deployments)
    assert [d.uri.split(":")[0] for d in deployments] == ["openai+https", "runpod"]
    assert deployments[0].cost_in == 0.1
    assert _agent_limits(compute.agents)["*"].max_tokens == 1000


def test_the_router_settings_are_the_compute_sections_router_keys(tmp_path: Path) -> None:
    path = tmp_path / "stitchwork.toml"
    path.write_text(TOML)
    config = load_config(path, environ={"STITCHWORK_COMPUTE__RETRIES": "5", "STITCHWORK_COMPUTE__AFFINITY": "session",
                                        "STITCHWORK_COMPUTE__COOLDOWN_S": "7.5"})
    settings = RouterSettings.from_config(config.compute)
    assert (settings.strategy, settings.retries, settings.affinity, settings.cooldown_s) == ("cost", 5, "session", 7.5)
    assert (settings.backoff_s, settings.failures_to_cooldown) == (0.05, 1)
    assert settings.fallbacks == {"llama": ("llama",)}
    assert (settings.max_backoff_s, settings.affinity_chars) == (2.0, 4096)  # only code sets these
    assert RouterSettings.from_config(ComputeConfig()) == RouterSettings()
    with pytest.raises(ConfigError, match="strategy"):
        RouterSettings.from_config(ComputeConfig(strategy="random"))
    with pytest.raises(ConfigError, match="failures_to_cooldown"):
        RouterSettings.from_config(ComputeConfig(failures_to_cooldown=0))


def test_bad_agent_limits_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        _agent_limits({"*": {"max_tokenz": 1}})
    with pytest.raises(ConfigError, match="list of model names"):
        _agent_limits({"bob": {"models": "llama"}})
