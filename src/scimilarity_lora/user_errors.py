"""A mistake in the input is one line that says what to do, not a traceback through Lightning and Hydra.

Every error this project raises for bad input (data, labels, genes, model folders, config values, unreachable
Census) is a ``ValueError`` (or ``FileNotFoundError``) with a message written for the user. The entry points print
that message and exit with status 2; ``SCIMILARITY_LORA_TRACEBACK=1`` shows the full traceback when debugging.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("SCIMILARITY_LORA_TRACEBACK") == "1":
                raise
            print(f"error: {e}\n(SCIMILARITY_LORA_TRACEBACK=1 shows the traceback)", file=sys.stderr)
            sys.exit(2)

    return wrapper
