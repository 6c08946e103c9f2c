"""DeepPlanning travel planning for multi-turn agent OPD.

- ``world``: a deterministic synthetic world (tasks + one database per task) in DeepPlanning's layout.
- ``database``: read-only task databases, loaded lazily into a bounded, thread-safe LRU cache.
- ``queries``: the nine travel tools as plain functions answering DeepPlanning's exact text.
- ``tools``: verl ``BaseTool`` adapters (the only module here that imports verl) and ``tool_config``.
- ``parity``: records DeepPlanning's own tool answers on a generated world (committed test data).
- ``plan``: the final-answer JSON schema (owned separately).
"""
