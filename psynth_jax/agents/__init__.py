"""Agent workflows: tools, ReAct agents on the explicit cache, and their task environments.

`tools` holds the tool interface every agent calls (typed functions with a JSON schema,
registered by name, bounded outputs); the environments (documents, files, a PostgreSQL
server) live beside it, one module each.
"""
