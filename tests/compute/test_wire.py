"""Assembly of streamed tool-call deltas, and tool calls written as text."""

from __future__ import annotations

import json

from stitchwork.compute._wire import assemble, chunks_from_completion, turn_from_completion
from stitchwork.compute.openai import tool_calls_from_content


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "x", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_interleaved_parallel_calls_are_assembled_by_index() -> None:
    body = assemble([
        _chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": '{"x"'}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "{"}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        _chunk({"tool_calls": [{"index": 1, "function": {"arguments": "}"}}]}, "tool_calls"),
    ])
    turn = turn_from_completion(body)
    assert [(c.id, c.name, json.loads(c.arguments)) for c in turn.tool_calls] == [("a", "f", {"x": 1}), ("b", "g", {})]


def test_deltas_without_index_are_matched_by_id_and_a_reused_index_with_a_new_id_is_a_new_call() -> None:
    body = assemble([
        _chunk({"tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}]}),
        _chunk({"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": "{"}}]}),
        _chunk({"tool_calls": [{"id": "a", "function": {"arguments": "}"}}]}),
        _chunk({"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": "}"}}]}),
    ])
    calls = body["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("a", "f", "{}"),
                                                                                           ("b", "g", "{}")]
    reused = assemble([
        _chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}}]}),
        _chunk({"tool_calls": [{"index": 0, "id": "b", "function": {"name": "g", "arguments": "{}"}}]}),
    ])
    assert [c["id"] for c in reused["choices"][0]["message"]["tool_calls"]] == ["a", "b"]


def test_chunks_round_trip_a_completion_with_usage() -> None:
    completion = {"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "hi", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"q": 1}'}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    again = assemble(chunks_from_completion(completion))
    assert again["choices"][0]["message"] == completion["choices"][0]["message"]
    assert again["usage"] == completion["usage"]


def test_tool_calls_written_as_text_are_parsed_only_for_offered_tools() -> None:
    offered = ["list_inbox", "read_email"]
    tagged = '<tool_call>\n{"name": "read_email", "arguments": {"id": "m1"}}\n</tool_call>'
    assert tool_calls_from_content(tagged, offered) == [{"name": "read_email", "arguments": '{"id": "m1"}'}]
    assert tool_calls_from_content('[{"name": "list_inbox", "parameters": {}}]', offered) == [
        {"name": "list_inbox", "arguments": "{}"}]
    assert tool_calls_from_content('```json\n{"name": "list_inbox", "arguments": {}}\n```', offered)
    assert tool_calls_from_content('{"name": "rm_rf", "arguments": {}}', offered) is None
    assert tool_calls_from_content("Here is {json} in prose", offered) is None
    assert tool_calls_from_content('{"answer": 42}', offered) is None
