"""Agents published over A2A: authenticated peers, runs through the gateway, untrusted peer text, approvals."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("a2a", reason="the a2a extra is not installed (pip install 'stitchwork[a2a]')")

from a2a.client import ClientConfig, create_client
from a2a.helpers import get_artifact_text
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState

from stitchwork.agents.runs import RunStatus
from stitchwork.errors import ConfigError
from stitchwork.platform import Platform
from tests.gateway.test_gateway import call, events, tool_results
from tests.interfaces.a2a_support import a2a_config, free_port, serve

KEY = "peer-key-" + "x" * 24
PEERS = {"partner": {"key": "secret://a2a_partner"}, "friend": {"key": "secret://a2a_friend", "trusted": True}}
SECRETS = {"a2a_partner": KEY, "a2a_friend": "friend-key-" + "y" * 24}
MAILER = [  # sends the report to whatever address the task named
    {"tool_calls": [call("send_email", {"to": "ops@partner.example", "subject": "report", "body": "all fine"},
                         "c1")]},
    {"content": "report sent"},
]
APPROVAL = [
    {"tool_calls": [call("write_note", {"name": "n.txt", "text": "hi"}, "c1")]},
    {"tool_calls": [call("delete_note", {"name": "n.txt"}, "c2")]},
    {"content": "cleaned up"},
]


def request(text: str, *, task_id: str = "") -> SendMessageRequest:
    message = Message(role=Role.ROLE_USER, parts=[Part(text=text)], message_id=uuid.uuid4().hex)
    if task_id:
        message.task_id = task_id
    return SendMessageRequest(message=message)


async def send(url: str, key: str, text: str, *, streaming: bool = False, task_id: str = "") -> list[Any]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        client = await create_client(url, client_config=ClientConfig(streaming=streaming, httpx_client=http))
        async with client:
            return [chunk async for chunk in client.send_message(request(text, task_id=task_id))]


def final_task(chunks: list[Any]) -> Any:
    tasks = [c.task for c in chunks if c.WhichOneof("payload") == "task"]
    assert tasks, [c.WhichOneof("payload") for c in chunks]
    return tasks[-1]


async def settled(url: str, task: Any, tries: int = 50) -> Any:
    """The task once its run stopped running: a slow host may answer WORKING after wait_s; asking again picks the
    same run up (as a peer would)."""
    for _ in range(tries):
        if task.status.state != TaskState.TASK_STATE_WORKING:
            return task
        task = final_task(await send(url, KEY, "and now?", task_id=task.id))
    return task


@pytest.fixture
def port() -> int:
    return free_port()


def config(tmp_path: Path, port: int, turns: list[dict[str, Any]], *, publish: dict[str, Any] | None = None,
           tools: list[str] | None = None, **a2a: Any) -> Any:
    names = tools or ["send_email"]
    return a2a_config(tmp_path, {"mailer": (turns, names)},
                      {"publish": publish or {"mailer": {}}, "peers": PEERS, **a2a}, port=port,
                      tools_dir=_tools(tmp_path))


def _tools(tmp_path: Path) -> Path:
    from tests.conftest import NOTE_TOOL

    directory = tmp_path / "tools"
    if not directory.exists():
        import shutil

        from stitchwork.platform import BUILTIN_TOOLS

        shutil.copytree(BUILTIN_TOOLS, directory, ignore=shutil.ignore_patterns("__pycache__"))
        (directory / "notes.py").write_text(NOTE_TOOL)
        for name, effect in (("write_note", "write"), ("delete_note", "irreversible")):
            text = '\nproperties.text = { type = "string" }' if name == "write_note" else ""
            required = '["name", "text"]' if name == "write_note" else '["name"]'
            (directory / f"{name}.toml").write_text(
                f'name = "{name}"\ndescription = "d"\nside_effect = "{effect}"\nentry = "notes.py:{name}"\n'
                f'target = "name"\n[args]\ntype = "object"\nrequired = {required}\nadditionalProperties = false\n'
                f'properties.name = {{ type = "string", format = "relative-path" }}{text}\n')
    return directory


async def test_unauthenticated_and_unpublished_requests_are_refused_and_audited(tmp_path: Path, port: int) -> None:
    cfg = config(tmp_path, port, MAILER)
    async with serve(cfg, SECRETS) as (service, operator):
        base = f"http://127.0.0.1:{port}/a2a"
        body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage",
                "params": {"message": {"role": "ROLE_USER", "parts": [{"text": "hi"}], "messageId": "m1"}}}
        async with httpx.AsyncClient(timeout=10) as http:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {KEY}x"},
                            {"Authorization": f"Bearer {operator}"}, {"Authorization": "Basic " + KEY}):
                card = await http.get(f"{base}/mailer/.well-known/agent-card.json", headers=headers)
                assert card.status_code == 401, (headers, card.text)
                rpc = await http.post(f"{base}/mailer", json=body, headers={**headers, "A2A-Version": "1.0"})
                assert rpc.status_code == 401 and rpc.json()["error"] in {"token_missing", "token_invalid"}
            hidden = await http.get(f"{base}/tester/.well-known/agent-card.json",
                                    headers={"Authorization": f"Bearer {KEY}"})
            assert hidden.status_code == 404  # not published, whoever asks
            card = await http.get(f"{base}/mailer/.well-known/agent-card.json",
                                  headers={"Authorization": f"Bearer {KEY}"})
            assert card.status_code == 200 and card.json()["name"] == "mailer"
            assert card.json()["supportedInterfaces"][0]["url"] == f"{base}/mailer"
        assert service.platform.runs.list() == []  # nothing ran for the refused callers
        refusals = [e for e in events(service.platform, "auth") if e["tool"] == "a2a"]
        assert len(refusals) == 10 and all(e["decision"] == "deny" for e in refusals)


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_peer_message_runs_the_agent_through_the_gateway(tmp_path: Path, port: int, streaming: bool) -> None:
    turns = [{"content": "the answer is 42"}]
    cfg = config(tmp_path, port, turns)
    async with serve(cfg, SECRETS) as (service, _):
        chunks = await send(f"http://127.0.0.1:{port}/a2a/mailer", KEY, "what is the answer?", streaming=streaming)
        if streaming:
            kinds = [c.WhichOneof("payload") for c in chunks]
            assert "artifact_update" in kinds and kinds[-1] == "status_update"
            assert chunks[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
            text = "".join(get_artifact_text(c.artifact_update.artifact, delimiter="") for c in chunks
                           if c.WhichOneof("payload") == "artifact_update")
        else:
            task = final_task(chunks)
            assert task.status.state == TaskState.TASK_STATE_COMPLETED
            text = get_artifact_text(task.artifacts[0], delimiter="")
        assert text == "the answer is 42"
        (run,) = service.platform.runs.list()
        assert run.agent == "mailer" and run.task == "what is the answer?" and run.status is RunStatus.COMPLETED
        a2a_events = events(service.platform, "a2a")
        assert [(e["agent"], e["run_id"], e["data"]["peer"]) for e in a2a_events] == [("mailer", run.id, "partner")]
        assert [e["run_id"] for e in events(service.platform, "model")] == [run.id]  # the model call passed too
        assert service.platform.audit.verify().ok


async def test_a_v03_caller_is_served_too(tmp_path: Path, port: int) -> None:
    cfg = config(tmp_path, port, [{"content": "pong"}])
    async with serve(cfg, SECRETS) as (_, _op), httpx.AsyncClient(timeout=30) as http:
        body = {"jsonrpc": "2.0", "id": 7, "method": "message/send",
                "params": {"message": {"kind": "message", "role": "user", "messageId": "m1",
                                       "parts": [{"kind": "text", "text": "ping"}]}}}
        answer = (await http.post(f"http://127.0.0.1:{port}/a2a/mailer/", json=body,
                                  headers={"Authorization": f"Bearer {KEY}"})).json()
        assert answer["result"]["status"]["state"] == "completed", answer
        assert answer["result"]["artifacts"][0]["parts"][0]["text"] == "pong"
        junk = await http.post(f"http://127.0.0.1:{port}/a2a/mailer", content=b"{not json",
                               headers={"Authorization": f"Bearer {KEY}", "A2A-Version": "1.0",
                                        "content-type": "application/json"})
        assert junk.status_code in {200, 400} and "error" in junk.json()  # a JSON-RPC parse error, not a 500


@pytest.mark.parametrize(("key", "trusted"), [(KEY, False), (SECRETS["a2a_friend"], True)])
async def test_what_a_peer_names_is_untrusted_unless_the_operator_trusts_the_peer(
        tmp_path: Path, port: int, key: str, trusted: bool) -> None:
    cfg = config(tmp_path, port, MAILER)
    async with serve(cfg, SECRETS) as (service, _):
        chunks = await send(f"http://127.0.0.1:{port}/a2a/mailer", key,
                            "Mail the status report to ops@partner.example please")
        assert final_task(chunks).status.state == TaskState.TASK_STATE_COMPLETED
        (run,) = service.platform.runs.list()
        outcome = tool_results(service.platform.runs.get(run.id))["c1"]
        if trusted:
            assert outcome["status"] == "ok", outcome
        else:  # the recipient came from another agent's text: the injection rule holds
            assert outcome["status"] == "denied", outcome
            assert "external-tainted-target" in outcome["error"]["policy_ids"]


async def test_run_tokens_authenticate_as_agent_peers_unless_the_publication_excludes_them(
        tmp_path: Path, port: int) -> None:
    cfg = config(tmp_path, port, [{"content": "hello agent"}], publish={"mailer": {"peers": ["partner"]}})
    async with serve(cfg, SECRETS) as (service, _):
        platform = service.platform
        platform.gateway.open_run("run_x", "mailer", workdir=tmp_path / "w", max_steps=3)
        token = platform.tokens.issue("mailer", "run_x")
        async with httpx.AsyncClient(timeout=10) as http:
            refused = await http.get(f"http://127.0.0.1:{port}/a2a/mailer/.well-known/agent-card.json",
                                     headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 401 and "agent:mailer" in refused.json()["message"]
    cfg = config(tmp_path, free_port(), [{"content": "hello agent"}])
    async with serve(cfg, SECRETS) as (service, _):
        platform = service.platform
        platform.gateway.open_run("run_y", "mailer", workdir=tmp_path / "w", max_steps=3)
        token = platform.tokens.issue("mailer", "run_y")
        chunks = await send(f"{cfg.a2a.public_url}/a2a/mailer", token, "hi")
        assert final_task(chunks).status.state == TaskState.TASK_STATE_COMPLETED
        assert events(platform, "a2a")[0]["data"]["peer"] == "agent:mailer"
        platform.tokens.revoke(token, reason="test")
        with pytest.raises(Exception):  # noqa: B017 - the client surfaces the 401 as its own error
            await send(f"{cfg.a2a.public_url}/a2a/mailer", token, "again")


async def test_a_run_waiting_for_approval_is_picked_up_by_the_next_message(tmp_path: Path, port: int) -> None:
    cfg = config(tmp_path, port, APPROVAL, tools=["write_note", "delete_note"], wait_s=0.3)
    async with serve(cfg, SECRETS) as (service, _):
        url = f"http://127.0.0.1:{port}/a2a/mailer"
        task = await settled(url, final_task(await send(url, KEY, "tidy up n.txt")))
        assert task.status.state == TaskState.TASK_STATE_AUTH_REQUIRED
        (approval,) = service.approvals("pending")
        assert approval["id"] in task.status.message.parts[0].text
        await service.decide(approval["id"], approve=True, by="operator")
        task = await settled(url, final_task(await send(url, KEY, "done yet?", task_id=task.id)))
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        assert get_artifact_text(task.artifacts[0], delimiter="") == "cleaned up"
        assert len(service.platform.runs.list()) == 1  # the same run, not a second one
        # another peer cannot read or continue this task
        with pytest.raises(Exception):  # noqa: B017
            await send(url, SECRETS["a2a_friend"], "mine now", task_id=task.id)


async def get_task(url: str, key: str, task_id: str) -> Any:
    from a2a.types import GetTaskRequest

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        client = await create_client(url, client_config=ClientConfig(httpx_client=http))
        async with client:
            return await client.get_task(GetTaskRequest(id=task_id))


async def list_tasks(url: str, key: str) -> list[str]:
    from a2a.types import ListTasksRequest

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        client = await create_client(url, client_config=ClientConfig(httpx_client=http))
        async with client:
            return [t.id for t in (await client.list_tasks(ListTasksRequest())).tasks]


async def test_tasks_survive_a_restart_of_the_platform(tmp_path: Path, port: int) -> None:
    cfg = config(tmp_path, port, APPROVAL, tools=["write_note", "delete_note"], wait_s=0.3)
    url = f"http://127.0.0.1:{port}/a2a/mailer"
    async with serve(cfg, SECRETS) as (service, _):
        task = await settled(url, final_task(await send(url, KEY, "tidy up n.txt")))
        assert task.status.state == TaskState.TASK_STATE_AUTH_REQUIRED
        (approval,) = service.approvals("pending")
    async with serve(cfg, SECRETS) as (service, _):  # a new platform on the same state directory
        got = await get_task(url, KEY, task.id)
        assert (got.id, got.context_id, got.status.state) == (task.id, task.context_id, task.status.state)
        assert approval["id"] in got.status.message.parts[0].text
        with pytest.raises(Exception):  # noqa: B017 - another peer does not see it
            await get_task(url, SECRETS["a2a_friend"], task.id)
        assert await list_tasks(url, KEY) == [task.id] and await list_tasks(url, SECRETS["a2a_friend"]) == []
        await service.decide(approval["id"], approve=True, by="operator")
        done = await settled(url, final_task(await send(url, KEY, "done yet?", task_id=task.id)))
        assert done.status.state == TaskState.TASK_STATE_COMPLETED
        assert get_artifact_text(done.artifacts[0], delimiter="") == "cleaned up"
        assert len(service.platform.runs.list()) == 1  # the task kept its run across the restart
        assert (await get_task(url, KEY, task.id)).status.state == TaskState.TASK_STATE_COMPLETED


def test_publication_config_errors_are_clear(tmp_path: Path) -> None:
    from stitchwork.service import Service
    from stitchwork.service.a2a import A2APublisher

    cases = [
        ({"publish": {"nobody": {}}}, "unknown agent 'nobody'"),
        ({"publish": {"mailer": {"peers": ["ghost"]}}, "peers": PEERS}, "unknown peer(s) ghost"),
        ({"publish": {"mailer": {"colour": 1}}}, "unknown key(s) colour"),
        ({"peers": {"p": {"key": "literal"}}}, "vault reference"),
        ({"peers": {"p": {}}}, "needs key"),
        ({"peers": {"agent:x": {"key": "secret://k"}}}, "platform's own agents"),
        ({"peers": {"p": {"key": "secret://k", "trusted": "yes"}}}, "true or false"),
    ]
    for index, (a2a, message) in enumerate(cases):
        cfg = a2a_config(tmp_path / str(index), {"mailer": ([{"content": "x"}], [])}, a2a, port=1)
        platform = Platform.open(cfg)
        try:
            with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
                A2APublisher(Service(platform))
        finally:
            import asyncio

            asyncio.run(platform.aclose())


def test_trust_label_is_recorded_in_the_run_provenance(tmp_path: Path) -> None:
    from stitchwork.security.taint import Label

    cfg = a2a_config(tmp_path, {"mailer": ([{"content": "x"}], [])}, {}, port=1)
    platform = Platform.open(cfg)
    try:
        record = platform.runner.create("mailer", "mail bob@x.example", task_source=Label("a2a-peer:p", False))
        assert record.provenance["untrusted"] == [["a2a-peer:p", "mail bob@x.example", ""]]  # source, text, secrecy
        plain = platform.runner.create("mailer", "mail bob@x.example")
        assert plain.provenance == {}
        assert json.dumps(record.to_dict())  # checkpoints stay JSON
    finally:
        import asyncio

        asyncio.run(platform.aclose())


async def test_an_empty_or_textless_message_fails_the_task_clearly(tmp_path: Path, port: int) -> None:
    cfg = config(tmp_path, port, [{"content": "x"}])
    async with serve(cfg, SECRETS) as (service, _), httpx.AsyncClient(timeout=30) as http:
        url = f"http://127.0.0.1:{port}/a2a/mailer"
        headers = {"Authorization": f"Bearer {KEY}", "A2A-Version": "1.0"}
        for parts in ([{"text": "   "}], [{"data": {"k": 1}}]):
            body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage",
                    "params": {"message": {"role": "ROLE_USER", "parts": parts, "messageId": uuid.uuid4().hex}}}
            response = await http.post(url, json=body, headers=headers)
            assert response.status_code == 200, response.text
            task = response.json()["result"]["task"]
            assert task["status"]["state"] == "TASK_STATE_FAILED", task
            assert "run_error" in json.dumps(task["status"])
        assert service.platform.runs.list() == []
        errors = [e for e in events(service.platform, "a2a") if e["decision"] == "error"]
        assert len(errors) == 2
