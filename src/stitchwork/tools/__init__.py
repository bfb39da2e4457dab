"""Tool manifests: what a tool is, what it may touch, and how its arguments are checked."""

from stitchwork.tools.manifest import SideEffect, ToolManifest, ToolRegistry, load_tools

__all__ = ["SideEffect", "ToolManifest", "ToolRegistry", "load_tools"]
