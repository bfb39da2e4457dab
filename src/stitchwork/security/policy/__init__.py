"""Cedar policy engine: every tool call an agent makes is decided here.

A call becomes one Cedar request::

    principal  Stitchwork::Agent::"<agent name>"
    action     Stitchwork::Action::"<tool name>"      (in "read" | "write" | "external" | "irreversible")
    resource   Stitchwork::Target::"<target value>"   ("" when the tool has no target argument)
    context    { side_effect, approved, taint, budget, time, args }

The schema is generated from the registered tools (:attr:`PolicyEngine.schema_text`), and every policy file is
validated against it in strict mode when the engine loads, so a policy that names an unknown attribute or
compares mismatched types is refused at start-up with its file and line, not at the first call.

Approvals are written in Cedar: a ``forbid`` annotated ``@approval("required")`` with
``unless { context.approved }``. A Deny whose deciding policies are all such forbids becomes
:attr:`Effect.ASK`, provided the same call with ``approved: true`` would be allowed (asking a human for a call
that stays denied anyway is pointless, so that case is a plain DENY). Any evaluation error is a DENY: the
engine fails closed.

Modules: :mod:`.text` (policy files, statements, ids, load errors with file and line), :mod:`.schema` (the
schema generated from the tools, entity types), :mod:`.context` (a call's Cedar context), :mod:`.projection`
(which policies and context attributes each tool needs), :mod:`.cache` (the bounded decision memory),
:mod:`.batch` (batching concurrent async calls) and :mod:`.engine` (:class:`PolicyEngine`).
"""

from stitchwork.security.policy.engine import Decision, Effect, PolicyEngine, Request
from stitchwork.security.policy.schema import NAMESPACE, SIDE_EFFECTS, SideEffect, ToolAction
from stitchwork.security.policy.text import PolicyInfo, builtin_policy_dir

__all__ = [
    "NAMESPACE",
    "SIDE_EFFECTS",
    "Decision",
    "Effect",
    "PolicyEngine",
    "PolicyInfo",
    "Request",
    "SideEffect",
    "ToolAction",
    "builtin_policy_dir",
]
