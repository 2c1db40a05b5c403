"""One module per pipeline stage: `run(cfg, ctx) -> counts` plus its Ray UDFs.

Tasks import `models` and libraries, never `pipelines` and never each other
(shared pieces live in `tasks.schema` and `tasks.context`).
"""
