"""The HTTP API: the aiohttp app and its routes, auth, problems (RFC 9457), OpenAPI, schemas,
connection limits, the pipelined Redis connection of the hot path, and the Python client.

May import every other room of ``dispatch`` except ``dispatch.cli``.
"""
