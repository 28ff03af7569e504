"""Client mistakes are not server errors: BentoML logs every refused request at ERROR with a traceback (a 4.9 MB
request of bad cells produced 92.7 MB of log). This filter turns the records of 4xx answers into one INFO line."""

from __future__ import annotations

import logging

#: the logger BentoML's HTTP app reports endpoint exceptions on
BENTOML_HTTP_LOGGER = "bentoml._internal.server.http_app"


class ClientErrorsAsInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _is_client_error(exc):
            return True
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        record.msg, record.args = f"{record.getMessage()}: refused ({detail})", ()
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return True


def _is_client_error(exc: BaseException) -> bool:
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    return isinstance(exc, BentoMLException) and exc.error_code.value < 500


def install() -> None:
    logger = logging.getLogger(BENTOML_HTTP_LOGGER)
    if not any(isinstance(f, ClientErrorsAsInfo) for f in logger.filters):
        logger.addFilter(ClientErrorsAsInfo())
