"""Wires the layers together from a :class:`~stitchwork.config.Config`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from stitchwork.agents.definition import AgentRegistry, load_agents
from stitchwork.agents.loop import Runner
from stitchwork.agents.runs import RunStore
from stitchwork.compute.assistant import with_default_assistant
from stitchwork.compute.gateway import MODEL_TOOL_ACTION
from stitchwork.compute.gateway import attach as attach_model_gateway
from stitchwork.config import Config
from stitchwork.data._base import Store, open_store
from stitchwork.data.memory import AgentMemory
from stitchwork.data.memory_tools import TOOLS_DIR as MEMORY_TOOLS
from stitchwork.data.memory_tools import MemoryTools
from stitchwork.errors import ConfigError
from stitchwork.gateway.core import Gateway
from stitchwork.gateway.idempotency import StoreLedger
from stitchwork.isolation._base import Limits
from stitchwork.security.approvals import ApprovalStore
from stitchwork.security.audit import AuditLog
from stitchwork.security.identity import CertificateAuthority, TokenService
from stitchwork.security.policy import PolicyEngine, ToolAction, builtin_policy_dir
from stitchwork.security.vault import Vault, open_vault
from stitchwork.tools.manifest import ToolRegistry, load_tools

PACKAGE_DIR = Path(__file__).resolve().parent
BUILTIN_TOOLS = PACKAGE_DIR / "demo" / "tools"
BUILTIN_AGENTS = PACKAGE_DIR / "demo" / "agents"


def ensure_state_dir(path: Path) -> Path:
    """Creates the state directory with owner-only permissions."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def open_vault_for(config: Config) -> Vault:
    ensure_state_dir(config.state_dir)
    return open_vault(config.vault_uri)


@dataclass
class Platform:
    """Every layer of one Stitchwork installation, opened from a config."""

    config: Config
    store: Store
    ca: CertificateAuthority
    tokens: TokenService
    audit: AuditLog
    approvals: ApprovalStore
    vault: Vault
    tools: ToolRegistry
    agents: AgentRegistry
    policy: PolicyEngine
    gateway: Gateway
    runs: RunStore
    runner: Runner
    memory: AgentMemory | None = field(default=None)
    """Every agent's memory (``stitchwork.data.memory``); its tools are registered when ``[data] memory_tools``."""

    @classmethod
    def open(cls, config: Config) -> Platform:
        """Opens the store, CA, vault, policies, tools and agents; a bad policy stops here with file and line."""
        state = ensure_state_dir(config.state_dir)
        tool_dirs = [*(config.tool_dirs or (BUILTIN_TOOLS,)), *([MEMORY_TOOLS] if config.data.memory_tools else [])]
        tools = load_tools(tool_dirs, max_arg_bytes=config.agents.max_arg_bytes)
        hosts = set(MemoryTools.HANDLERS) if config.data.memory_tools else set()
        if unbound := sorted(t.name for t in tools if t.host and t.host not in hosts):
            raise ConfigError(f"host-side tool(s) {', '.join(unbound)} name no registered handler")
        agents = load_agents(config.agent_dirs or (BUILTIN_AGENTS,))
        agents = with_default_assistant(agents, tools, model=config.compute.default_model)
        policy_paths = [builtin_policy_dir()] if config.security.builtin_policies else []
        policy_paths += [Path(p) for p in config.security.policy_dirs]
        policy = PolicyEngine.load(
            policy_paths,
            [ToolAction(t.name, t.side_effect.value, t.args_schema) for t in tools] + [MODEL_TOOL_ACTION],
            agents=agents.names(),
        )
        for agent in agents:
            for tool in agent.tools:
                if tool not in tools:
                    raise ConfigError(f"agent {agent.name!r} names unknown tool {tool!r}")
        store = open_store(config.store_uri)
        try:
            ca = CertificateAuthority.load_or_create(state, trust_domain=config.security.trust_domain)
            tokens = TokenService(ca, store, trust_domain=config.security.trust_domain,
                                  audience=config.security.audience, ttl_s=config.security.token_ttl_s)
            audit = AuditLog(store, signer=ca, journal_path=state / "audit.journal",
                             flush_ms=config.data.audit_flush_ms)
            approvals = ApprovalStore(store, timeout_s=config.security.approval_timeout_s)
            vault = open_vault(config.vault_uri)
            iso = config.isolation
            gateway = Gateway(
                tokens=tokens, policy=policy, audit=audit, approvals=approvals, vault=vault, tools=tools,
                agents={a.name: a.tools for a in agents}, default_sandbox=iso.default,
                limits=Limits(mem_mb=iso.mem_mb, cpu_s=iso.cpu_s, timeout_s=iso.timeout_s,
                              max_output_bytes=iso.max_output_bytes, max_pids=iso.max_pids),
                trusted_sources=frozenset(config.security.trusted_sources),
                audience=config.security.audience,
                idempotency=StoreLedger(store),
            )
            attach_model_gateway(gateway, config.compute)
            memory = AgentMemory(store, audit=audit)
            if config.data.memory_tools:
                for name, handler in MemoryTools(memory).handlers().items():
                    gateway.register_host(name, handler)
            runs = RunStore(store)
            runner = Runner(gateway, agents, runs, state_dir=state, max_seconds=config.agents.max_seconds)
        except BaseException:
            store.close()
            raise
        return cls(config, store, ca, tokens, audit, approvals, vault, tools, agents, policy, gateway, runs, runner,
                   memory)

    async def aclose(self) -> None:
        await self.gateway.aclose()
        await self.audit.aclose()
        self.vault.close()
        self.store.close()
