"""Stitchwork: run autonomous agents with every tool and model call authenticated, authorized, sandboxed
and audited by one gateway.

The public SDK (:mod:`stitchwork.sdk`) opens sessions for agents that run elsewhere::

    from stitchwork import Stitchwork
    session = Stitchwork(url, operator_token).session("inbox-assistant", "Summarise my inbox")
"""

from stitchwork.errors import StitchworkError
from stitchwork.sdk import AsyncSession, RemoteError, Session, Stitchwork, ToolResult

__version__ = "0.1.0"
__all__ = ["AsyncSession", "RemoteError", "Session", "Stitchwork", "StitchworkError", "ToolResult", "__version__"]
