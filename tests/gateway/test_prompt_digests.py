"""``prompt_sha256`` computed incrementally per run is exactly the digest of the whole prompt."""

from __future__ import annotations

from typing import Any

from stitchwork.gateway.context import digest as _digest
from stitchwork.gateway.models import PromptDigests


def prompt(steps: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "sé"}, {"role": "user", "content": "go"}]
    for i in range(steps):
        messages.append({"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "z": 1, "a": [i]}]})
        messages.append({"role": "tool", "content": {"n": i, "float": 0.5, "none": None}})
    return messages


def test_the_digest_of_a_growing_prompt_equals_the_full_digest() -> None:
    digests = PromptDigests()
    for steps in range(6):
        assert digests.digest("run_1", prompt(steps)) == _digest(prompt(steps))
    assert digests.digest("run_1", []) == _digest([])


def test_an_edited_or_shorter_prompt_is_hashed_again_from_the_start() -> None:
    digests = PromptDigests()
    digests.digest("run_1", prompt(4))
    edited = prompt(4)
    edited[2]["tool_calls"][0]["a"] = ["changed"]
    assert digests.digest("run_1", edited) == _digest(edited)
    assert digests.digest("run_1", prompt(2)) == _digest(prompt(2))
    assert digests.digest("run_1", prompt(5)) == _digest(prompt(5))


def test_other_prompts_and_runs_fall_back_or_stay_apart() -> None:
    digests = PromptDigests(size=2)
    assert digests.digest("", prompt(1)) == _digest(prompt(1))
    assert digests.digest("run_1", None) == _digest(None)
    assert digests.digest("run_1", "text") == _digest("text")
    for run in ("a", "b", "c"):
        assert digests.digest(run, prompt(2)) == _digest(prompt(2))
    assert list(digests._runs) == ["b", "c"]
