"""Commands of the messaging layer: ``stitchwork worker``, ``submit``, ``runs dead|resubmit`` and ``kafka-export``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import typer

from stitchwork.config import load_config
from stitchwork.errors import StitchworkError
from stitchwork.interfaces.cli._common import (
    ConfigOpt,
    FormatOpt,
    JsonOpt,
    console,
    exit_for_run,
    fail,
    group,
    output_format,
    print_json,
    print_rows,
    server_side,
    working,
)
from stitchwork.interfaces.cli.runs import RUNS_HELP


def register(app: typer.Typer) -> None:
    """Adds ``worker`` and ``submit`` to the ``stitchwork`` command line."""

    @app.command()
    def worker(
        bus: str = typer.Option(None, "--bus", help="Bus URI (default: [messaging] bus, or the one `up` started)."),
        concurrency: int = typer.Option(None, "--concurrency", help="Runs driven at a time (default 4)."),
        name: str = typer.Option("", "--name", help="Worker name (default host-pid); its state dir is "
                                 "<state>/workers/<name>."),
        ack_wait: float = typer.Option(None, "--ack-wait", help="Seconds before an unacknowledged job moves on."),
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Process runs from the durable run queue until interrupted (any number of workers share it)."""
        bus_uri = server_side("stitchwork.messaging.embedded", "stitchwork worker").bus_uri
        open_worker = server_side("stitchwork.platform", "stitchwork worker").open_worker
        try:
            config = load_config(config_path)
            uri = bus or bus_uri(config)
        except StitchworkError as exc:
            fail(exc)
        m = config.messaging

        async def serve() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            runner = await open_worker(config, bus_uri=uri, name=name, concurrency=concurrency or m.worker_concurrency,
                                       ack_wait_s=ack_wait or m.ack_wait_s, max_deliver=m.max_deliver)
            console.print(f"worker {runner.name} on {uri} (concurrency {runner.concurrency})", highlight=False)
            try:
                await runner.run(stop)
            finally:
                await runner.aclose()

        try:
            asyncio.run(serve())
        except StitchworkError as exc:
            fail(exc)

    @app.command()
    def submit(
        agent: str = typer.Argument(..., help="Agent name."),
        task: str = typer.Argument(..., help="What the agent should do."),
        model: str = typer.Option(None, "--model", help="Model URI (overrides the agent's)."),
        wait: bool = typer.Option(False, "--wait", help="Wait until the run finishes (or waits for approval)."),
        bus: str = typer.Option(None, "--bus", help="Bus URI (default: [messaging] bus)."),
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Put a run on the durable queue for `stitchwork worker`; prints its id (or, with --wait, its result).

        With --wait, exits with the run's outcome: 0 completed, 1 failed, 3 denied, 4 waiting for approval,
        5 timed out.
        """
        from stitchwork.messaging._base import open_bus
        from stitchwork.messaging.embedded import bus_uri
        from stitchwork.workers.queue import enqueue_run, wait_for_run
        from stitchwork.workers.subjects import Subjects

        async def go() -> dict[str, object]:
            config = load_config(config_path)
            subjects = Subjects(config.messaging.subject_prefix)
            opened = await open_bus(bus or bus_uri(config))
            try:
                run_id = await enqueue_run(opened, agent, task, model=model, subjects=subjects)
                if not wait:
                    return {"id": run_id, "status": "queued"}
                return await wait_for_run(opened, run_id, subjects=subjects)
            finally:
                with contextlib.suppress(StitchworkError):
                    await opened.aclose()

        try:
            with working("waiting for the run" if wait else "queueing the run"):
                result = asyncio.run(go())
        except StitchworkError as exc:
            fail(exc)
        print_json({k: v for k, v in result.items() if k != "messages"})
        exit_for_run(result)

    runs_app = group(app, "runs", RUNS_HELP)

    def _on_bus(bus: str | None, config_path: Path | None, act: Any) -> Any:
        from stitchwork.messaging._base import open_bus
        from stitchwork.messaging.embedded import bus_uri
        from stitchwork.workers.subjects import Subjects

        async def go() -> Any:
            config = load_config(config_path)
            opened = await open_bus(bus or bus_uri(config))
            try:
                return await act(opened, Subjects(config.messaging.subject_prefix))
            finally:
                with contextlib.suppress(StitchworkError):
                    await opened.aclose()

        try:
            return asyncio.run(go())
        except StitchworkError as exc:
            fail(exc)

    @runs_app.command("dead")
    def runs_dead(
        fmt: str = FormatOpt,
        as_json: bool = JsonOpt,
        bus: str = typer.Option(None, "--bus", help="Bus URI (default: [messaging] bus)."),
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """List runs given up on (dead letters): why, after how many attempts, by which worker."""
        from stitchwork.workers.deadletters import dead_letters

        fmt = output_format(fmt, as_json)
        letters = _on_bus(bus, config_path, lambda b, s: dead_letters(b, subjects=s))
        if fmt != "json":
            letters = [{k: letter.get(k) for k in ("run_id", "retryable", "attempts", "worker", "error")}
                       for letter in letters]
        print_rows(letters, fmt, title="dead letters", empty="no dead letters")

    @runs_app.command("resubmit")
    def runs_resubmit(
        run_id: str = typer.Argument(..., help="A dead-lettered run."),
        bus: str = typer.Option(None, "--bus", help="Bus URI (default: [messaging] bus)."),
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Put a dead-lettered run back on the queue (it resumes from its last checkpoint)."""
        from stitchwork.workers.deadletters import resubmit

        _on_bus(bus, config_path, lambda b, s: resubmit(b, run_id, subjects=s, by="operator:cli"))
        console.print(f"run {run_id} queued again", highlight=False)

    @app.command("kafka-export")
    def kafka_export(
        uri: str = typer.Argument(..., help="kafka://host:port[,host:port]"),
        events_topic: str = typer.Option("stitchwork.events", "--events-topic", help="Topic for run events."),
        audit_topic: str = typer.Option("", "--audit-topic", help="Also copy new audit events here (needs the "
                                        "platform's database: run it while `stitchwork up` is stopped)."),
        follow: bool = typer.Option(False, "--follow", help="Keep exporting new events until interrupted."),
        bus: str = typer.Option(None, "--bus", help="Bus URI (default: [messaging] bus)."),
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Stream run events (and, with --audit-topic, the audit log) into Kafka; resumes where it stopped."""
        KafkaSink = server_side("stitchwork.messaging.kafka", "stitchwork kafka-export").KafkaSink
        from stitchwork.messaging._base import open_bus
        from stitchwork.messaging.embedded import bus_uri
        from stitchwork.workers.export import export_audit, export_events
        from stitchwork.workers.subjects import Subjects

        async def go() -> tuple[int, int]:
            config = load_config(config_path)
            sink = await KafkaSink.connect(uri)
            try:
                audited = 0
                if audit_topic:
                    from stitchwork.platform import Platform

                    mark = config.state_dir / "kafka-audit.seq"
                    after = int(mark.read_text()) if mark.exists() else 0
                    platform = Platform.open(config)
                    try:
                        last = await export_audit(platform.audit, platform.store, sink, topic=audit_topic,
                                                  after_seq=after)
                    finally:
                        await platform.aclose()
                    mark.write_text(str(last))
                    audited = last - after
                opened = await open_bus(bus or bus_uri(config))
                stop = asyncio.Event()
                if follow:
                    loop = asyncio.get_running_loop()
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.add_signal_handler(sig, stop.set)
                try:
                    subjects = Subjects(config.messaging.subject_prefix)
                    exported = await export_events(opened, sink, subject=subjects.events(), topic=events_topic,
                                                   stop=stop, idle_s=0.0 if follow else 1.0)
                finally:
                    await opened.aclose()
                return exported, audited
            finally:
                await sink.aclose()

        try:
            exported, audited = asyncio.run(go())
        except StitchworkError as exc:
            fail(exc)
        console.print(f"exported {exported} run events to {events_topic}"
                      + (f" and {audited} audit events to {audit_topic}" if audit_topic else ""))

