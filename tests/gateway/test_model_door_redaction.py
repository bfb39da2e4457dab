"""The model door over HTTP redacts what an agent sends before any provider sees it, also when the client resends
its whole conversation at each request (only messages that changed are redacted again; the answer must be the
same as redacting everything each time)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.gateway.test_model_door import KEY, config, open_platform
from tests.plugins.models import TOOLS

OTHER = "tok-other-Vb71XcQe0LmPz"


async def test_resent_conversations_are_redacted_like_whole_bodies(fake: Callable[..., Any], tmp_path: Path) -> None:
    server = await fake("vllm")
    cfg = config(tmp_path, deployments=[{"model": "llama", "uri": server.uri(key="secret://provider_key"),
                                         "id": "only"}])
    platform = open_platform(cfg)
    platform.vault.set("other", OTHER)
    platform.gateway.refresh_secrets()
    door = platform.gateway.models
    token = platform.tokens.issue("assistant", "run-redact")
    redactor = door.context.redactor
    try:
        messages: list[dict[str, Any]] = [{"role": "system", "content": "be careful"},
                                          {"role": "user", "content": f"my key is {KEY}"}]
        sent: list[dict[str, Any]] = []
        bodies = [
            {"model": "llama", "messages": messages, "tools": TOOLS},
            # the same conversation again (new objects, as parsed from a new request), one message more
            {"model": "llama", "messages": [*copy.deepcopy(messages), {"role": "user", "content": "and " + OTHER}],
             "tools": TOOLS, "user": KEY},
            # an earlier message edited to hold a secret: compared, not trusted by position
            {"model": "llama", "messages": [{"role": "system", "content": f"be careful {OTHER}"},
                                            *copy.deepcopy(messages[1:])]},
            # a secret as a key, a non-dict message: the whole body is redacted the plain way
            {"model": "llama", "messages": [{"role": "user", "content": "x", KEY: 1}, "stray " + OTHER]},
        ]
        for body in bodies:
            expected = redactor.redact(copy.deepcopy(body))
            request = door._redact_request(await door.authenticate(token, action="model_call"), body)
            assert request == expected
            sent.append(request)
        await door.chat(token, bodies[1])
        upstream = json.dumps(server.requests[-1])
        assert KEY not in upstream and OTHER not in upstream and "[secret:other]" in upstream
        assert KEY not in json.dumps(sent) and OTHER not in json.dumps(sent)
        assert bodies[0]["messages"][1]["content"] == f"my key is {KEY}"  # the client's body is not changed
    finally:
        await platform.aclose()
