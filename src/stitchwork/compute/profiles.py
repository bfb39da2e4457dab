"""Backend profiles: what each OpenAI-compatible server gets wrong, and what the client does about it.

Chosen by ``?profile=`` on an ``openai+http(s)://`` URI (default ``generic``).

=========  ======================================================================================================
profile    quirks and the client's workaround
=========  ======================================================================================================
vllm       ``tool_choice="auto"`` is refused (HTTP 400) unless the server runs with ``--enable-auto-tool-choice
           --tool-call-parser NAME``; with the parser, auto is its default anyway. The client never sends
           ``"auto"``, and a 400 that names the parser is reported with the flags to add.
sglang     Its tool-call parsers (and Mistral-family chat templates) require the tool-call ids of the history to
           be echoed unchanged, some as exactly 9 alphanumerics. The client never rewrites an id it received and
           synthesizes 9-alphanumeric ids when a server sends none.
llamacpp   ``llama-server`` refuses ``tools`` without ``--jinja`` (the client reports the flag); some chat
           templates return the call as JSON text in ``content`` (``{"name": ..., "arguments": ...}``, a list of
           those, or inside ``<tool_call>`` tags). The client parses such content into tool calls when it names an
           offered tool.
ollama     Ignores ``tool_choice``, and can drop tool calls when streaming. The client emulates ``tool_choice``
           (``none``: no tools sent; a named function: only that tool sent; ``required``: a turn without a call
           is an error) and, when tools are offered, asks without streaming and replays the answer as a stream.
generic    The OpenAI API as documented; no workaround. Ids are still never rewritten.
=========  ======================================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from stitchwork.errors import ConfigError


@dataclass(frozen=True)
class Profile:
    """How one backend family deviates from the OpenAI API.

    Attributes:
        name: The profile name used in URIs.
        send_auto_tool_choice: Send ``tool_choice="auto"`` when asked; vLLM refuses it without its parser.
        honours_tool_choice: The server applies ``tool_choice``; if not, the client emulates it.
        stream_tool_calls: Tool calls survive streaming; if not, a request offering tools is sent unstreamed and
            its answer replayed as chunks.
        tool_calls_in_content: Parse tool calls written as JSON text in ``content``.
        synthesized_id_length: Length of the alphanumeric id made up for a tool call that arrives without one.
        stream_usage: Ask for usage in the last chunk (``stream_options.include_usage``).
        parser_hint: What to tell the operator when the server refuses tools for want of a flag.
    """

    name: str
    send_auto_tool_choice: bool = True
    honours_tool_choice: bool = True
    stream_tool_calls: bool = True
    tool_calls_in_content: bool = False
    synthesized_id_length: int = 24
    stream_usage: bool = True
    parser_hint: str = ""


PROFILES: dict[str, Profile] = {
    "generic": Profile("generic"),
    "vllm": Profile(
        "vllm", send_auto_tool_choice=False,
        parser_hint="start vLLM with --enable-auto-tool-choice --tool-call-parser <parser for the model>",
    ),
    "sglang": Profile("sglang", synthesized_id_length=9,
                      parser_hint="start SGLang with --tool-call-parser <parser for the model>"),
    "llamacpp": Profile("llamacpp", tool_calls_in_content=True,
                        parser_hint="start llama-server with --jinja (tool calls need the model's chat template)"),
    "ollama": Profile("ollama", honours_tool_choice=False, stream_tool_calls=False, stream_usage=False,
                      parser_hint="use a model whose Ollama template supports tools"),
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``.

    Raises:
        ConfigError: no such profile.
    """
    try:
        return PROFILES[name or "generic"]
    except KeyError:
        raise ConfigError(f"unknown model profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


__all__ = ["PROFILES", "Profile", "get_profile"]
