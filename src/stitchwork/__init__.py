"""Stitchwork: run autonomous agents with every tool and model call authenticated, authorized, sandboxed
and audited by one gateway."""

from stitchwork.errors import StitchworkError

__version__ = "0.1.0"
__all__ = ["StitchworkError", "__version__"]
