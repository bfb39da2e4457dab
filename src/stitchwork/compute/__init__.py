"""compute layer: the model port (``open_model(uri)``), the OpenAI-compatible client with backend profiles, the
router, the model gateway and the fake OpenAI-compatible server for tests."""

from stitchwork.compute._base import MODELS, Model, ModelTurn, ToolCall, Usage, open_model

__all__ = ["MODELS", "Model", "ModelTurn", "ToolCall", "Usage", "open_model"]
