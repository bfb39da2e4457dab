"""The A2A door over HTTP: published agents at ``/a2a/<agent>`` (A2A 1.0 JSON-RPC, with 0.3 compatibility).

``GET /a2a/<agent>/.well-known/agent-card.json`` serves the agent card; ``POST /a2a/<agent>`` takes
``SendMessage`` / ``SendStreamingMessage`` (header ``A2A-Version: 1.0``), ``message/send`` / ``message/stream``
(A2A 0.3), ``GetTask`` and ``CancelTask``. Every request is authenticated (a peer's key or a run token, see
:mod:`stitchwork.service.a2a`) before the protocol layer reads its body; an unpublished agent is 404.

A message starts a run of the agent (its text untrusted unless the peer is trusted); the answer is the run's
result as the task's artifact. A run that waits for a human approval longer than ``[a2a] wait_s`` is answered as
``TASK_STATE_AUTH_REQUIRED`` (or ``WORKING`` while it still runs), with the approval ids; another message to the
same task picks the run up again. Tasks are kept in the platform's store (:class:`~stitchwork.service.a2a.A2ATasks`,
by peer): ``GetTask`` answers after a restart, and a message to the task continues the same run. Needs the ``a2a``
extra.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from stitchwork.agents.runs import RunRecord, RunStatus
from stitchwork.errors import AuthError, ConfigError, StitchworkError
from stitchwork.interfaces.http._auth import bearer
from stitchwork.service import Service
from stitchwork.service.a2a import A2APublisher, Peer

PREFIX = "/a2a/"
EXTRA = "pip install 'stitchwork[a2a]'"
PEER_STATE = "stitchwork.a2a.peer"
MAX_TASKS = 10_000
"""Most tasks of one peer a ``ListTasks`` looks at (the most recently updated)."""


def _json_error(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _build(service: Service, publisher: A2APublisher, agent: str, base_url: str) -> tuple[Any, Any]:
    """The card route and JSON-RPC route (ASGI apps) of one published agent."""
    from a2a.auth.user import User
    from a2a.helpers import new_task_from_user_message, new_text_message, new_text_part
    from a2a.server.agent_execution import AgentExecutor, RequestContext, SimpleRequestContextBuilder
    from a2a.server.context import ServerCallContext
    from a2a.server.events import EventQueue
    from a2a.server.owner_resolver import resolve_user_scope
    from a2a.server.request_handlers import DefaultRequestHandler
    from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
    from a2a.server.routes.common import DefaultServerCallContextBuilder
    from a2a.server.tasks import InMemoryTaskStore, TaskStore, TaskUpdater
    from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, ListTasksRequest, Role, Task
    from google.protobuf.json_format import MessageToJson, Parse

    publication = publisher.publications[agent]
    spec = service.platform.agents.get(agent)
    tasks = publisher.tasks

    class DurableTaskStore(TaskStore):
        """The protocol's tasks in the platform's store (``a2a_tasks``), each peer's apart from the others'."""

        async def save(self, task: Task, context: ServerCallContext) -> None:
            tasks.save(resolve_user_scope(context), agent, task.id, task.context_id, MessageToJson(task))

        async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
            stored = tasks.get(resolve_user_scope(context), agent, task_id)
            if stored is None or not stored.task:
                return None
            found: Task = Parse(stored.task, Task())
            return found

        async def list(self, params: ListTasksRequest, context: ServerCallContext) -> Any:
            page = InMemoryTaskStore()  # the SDK's own filtering, ordering and paging over this peer's tasks
            for stored in tasks.find(resolve_user_scope(context), agent, limit=MAX_TASKS):
                await page.save(Parse(stored.task, Task()), context)
            return await page.list(params, context)

        async def delete(self, task_id: str, context: ServerCallContext) -> None:
            tasks.delete(resolve_user_scope(context), agent, task_id)

    class TaskContextBuilder(SimpleRequestContextBuilder):
        """A message naming only its task continues in the task's context: the SDK would make a new context id
        whenever the task is not active in this process (after a restart), and then refuse its own events."""

        async def build(self, context: ServerCallContext, params: Any = None, task_id: str | None = None,
                        context_id: str | None = None, task: Task | None = None) -> RequestContext:
            if task_id and not context_id:
                stored = tasks.get(resolve_user_scope(context), agent, task_id)
                context_id = stored.context_id if stored is not None and stored.context_id else None
            return await super().build(context, params, task_id, context_id, task)

    class PeerUser(User):
        def __init__(self, peer: Peer) -> None:
            self.peer = peer

        @property
        def is_authenticated(self) -> bool:
            return True

        @property
        def user_name(self) -> str:
            return self.peer.name  # the task store keeps each peer's tasks apart

    class PeerContextBuilder(DefaultServerCallContextBuilder):
        def build(self, request: Request) -> ServerCallContext:
            context = super().build(request)
            headers = context.state.get("headers")
            if isinstance(headers, dict):
                headers.pop("authorization", None)  # the bearer stays out of the protocol layer
            context.user = PeerUser(request.scope[PEER_STATE])
            context.state[PEER_STATE] = request.scope[PEER_STATE]
            return context

    class RunExecutor(AgentExecutor):
        """A message starts a run (or picks up the run of its task); the run's result is the task's artifact."""

        async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
            peer: Peer = context.call_context.state[PEER_STATE]
            task = context.current_task
            if task is None:
                assert context.message is not None
                task = new_task_from_user_message(context.message)
                await event_queue.enqueue_event(task)
            updater = TaskUpdater(event_queue, task.id, task.context_id)
            owner = resolve_user_scope(context.call_context)
            stored = tasks.get(owner, agent, task.id)
            run_id = stored.run_id if stored is not None else ""
            if not run_id:
                try:
                    record = await publisher.start(agent, peer, context.get_user_input(), context_id=task.context_id)
                except StitchworkError as exc:
                    await updater.failed(new_text_message(f"{exc.code}: {exc}", role=Role.ROLE_AGENT))
                    return
                run_id = record.id
                tasks.link(owner, agent, task.id, task.context_id, run_id)
                await updater.start_work(new_text_message(f"run {run_id} started", role=Role.ROLE_AGENT))
            record = await publisher.wait(run_id, publisher.config.wait_s)
            await self.report(updater, record)

        @staticmethod
        async def report(updater: Any, record: RunRecord) -> None:
            from a2a.types import TaskState

            def say(text: str) -> Any:
                return new_text_message(text, role=Role.ROLE_AGENT)

            if record.status is RunStatus.COMPLETED:
                await updater.add_artifact([new_text_part(record.result or "")], name="answer")
                await updater.complete()
            elif record.status is RunStatus.WAITING_APPROVAL:
                ids = ", ".join(record.pending.get("approvals", []))
                await updater.requires_auth(say(f"run {record.id} waits for an operator's approval ({ids}); "
                                                "send another message to this task to check again"))
            elif record.status is RunStatus.RUNNING:
                await updater.update_status(TaskState.TASK_STATE_WORKING,
                                            say(f"run {record.id} is still running; ask again later"))
            else:
                await updater.failed(say(f"run {record.id} {record.status.value}: {record.error or ''}".strip()))

        async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
            assert context.task_id is not None and context.context_id is not None
            await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()

    url = f"{base_url}{PREFIX}{agent}"
    card = AgentCard(
        name=agent, description=publication.description, version="1.0",
        supported_interfaces=[AgentInterface(protocol_binding="JSONRPC", url=url, protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"], default_output_modes=["text/plain"],
        skills=[AgentSkill(id=agent, name=agent, description=spec.system[:500] or publication.description,
                           tags=["stitchwork"])],
    )
    handler = DefaultRequestHandler(agent_executor=RunExecutor(), task_store=DurableTaskStore(), agent_card=card,
                                    request_context_builder=TaskContextBuilder())
    card_route = create_agent_card_routes(card, card_url="/")[0]
    rpc_route = create_jsonrpc_routes(handler, rpc_url="/", context_builder=PeerContextBuilder(),
                                      enable_v0_3_compat=True)[0]
    return card_route.app, rpc_route.app


class A2ADoor:
    """The ASGI app behind ``/a2a/{agent}...``: 404 for unpublished agents, 401 without a valid bearer, then the
    agent's card or JSON-RPC endpoint."""

    def __init__(self, service: Service, publisher: A2APublisher, base_url: str, *, card: bool) -> None:
        self.service, self.publisher, self.base_url, self.card = service, publisher, base_url, card
        self._apps: dict[str, tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        agent = str(scope.get("path_params", {}).get("agent", ""))
        if self.publisher.published(agent) is None:
            await _json_error(404, "unknown_agent", f"no agent {agent!r} is published over A2A")(scope, receive, send)
            return
        try:
            peer = await self.publisher.authenticate(agent, bearer(Request(scope)))
        except AuthError as exc:
            await _json_error(401, exc.code, str(exc))(scope, receive, send)
            return
        if agent not in self._apps:
            self._apps[agent] = _build(self.service, self.publisher, agent, self.base_url)
        scope[PEER_STATE] = peer
        card_app, rpc_app = self._apps[agent]
        await (card_app if self.card else rpc_app)(scope, receive, send)


def mount(app: FastAPI, service: Service) -> None:
    """Adds ``/a2a/{agent}`` when ``[a2a.publish]`` names agents (needs the ``a2a`` extra)."""
    config = service.platform.config
    publisher = A2APublisher(service)
    if not publisher.publications:
        return
    try:
        import a2a.server  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"[a2a.publish] needs the a2a extra: {EXTRA}") from exc
    base = (config.a2a.public_url or f"http://{config.server.host}:{config.server.port}").rstrip("/")
    card = A2ADoor(service, publisher, base, card=True)
    rpc = A2ADoor(service, publisher, base, card=False)
    app.router.routes.extend([
        Route(PREFIX + "{agent}/.well-known/agent-card.json", endpoint=card, methods=["GET"]),
        Route(PREFIX + "{agent}", endpoint=rpc, methods=["POST"]),
        Route(PREFIX + "{agent}/", endpoint=rpc, methods=["POST"]),
    ])


__all__ = ["A2ADoor", "mount"]
