"""The access log names paths, never query strings: a client that puts its key in the URL
(``?api_key=sk-...``, as some tools do) must not have it written to disk.

uvicorn logs each request as ``(client, method, path?query, http version, status)`` on the
``uvicorn.access`` logger; :class:`QueryRedactor` rewrites the third field of those records.
"""

from __future__ import annotations

import logging

ACCESS_LOGGER = "uvicorn.access"
REDACTED_QUERY = "?[query redacted]"


class QueryRedactor(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, query_mark, _ = args[2].partition("?")
            if query_mark:
                record.args = (args[0], args[1], path + REDACTED_QUERY, *args[3:])
        return True


def redact_access_log() -> None:
    """Install the redactor once (idempotent: apps are created more than once in tests)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, QueryRedactor) for f in logger.filters):
        logger.addFilter(QueryRedactor())
