"""The gateway: one gateway, several doors, over one shared context.

``context``      :class:`GatewayContext` (identity, policy, approvals, vault and redactor, audit, idempotency ledger,
                 sandboxes, live runs), built once by the platform; :class:`ToolOutcome`, :class:`RunContext`
``stages``       the pipeline's stages (authenticate, validate, replay, taint, authorize, approve, secrets, label,
                 audit) and :func:`policy_context`, the one Cedar context of every door
``tools``        the tool door (and the sandbox execute stage)
``host``         the host-tool door's execute stage (handlers of host-side tools)
``models``       the model door (model_call policy, provider keys, routing, metering)
``undo``         the undo door: a tool's declared compensation through the tool door's stages (Cedar action ``undo``)
``core``         :class:`Gateway`, the facade the agent loop and the platform use
``idempotency``  the idempotency ledger port (store and memory ledgers; the bus ledger is in ``workers``)
"""
