"""compute layer: the model port (``open_model(uri)``), the OpenAI-compatible client with backend profiles and the
router (the model gateway is ``stitchwork.gateway.models``; the fake OpenAI-compatible server for tests and
benchmarks is ``tests/fakes/openai_server.py``)."""

from stitchwork.compute._base import MODELS, Model, ModelTurn, ToolCall, Usage, open_model

__all__ = ["MODELS", "Model", "ModelTurn", "ToolCall", "Usage", "open_model"]
