"""A mistake in the input is one line that says what to do, not a traceback through Lightning and Hydra.

Every error this project raises for bad input (data, labels, genes, model folders, config values, unreachable
Census) is a ``ValueError`` (or ``FileNotFoundError``) with a message written for the user. The entry points print
that message and exit with status 2; ``SCIMILARITY_LORA_TRACEBACK=1`` shows the full traceback when debugging.
"""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

class DiskFullError(OSError):
    """No space left where a checkpoint or model directory is being written (nothing half-written is left)."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, DiskFullError)


@contextmanager
def no_space_is_a_user_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write that ran out of space under ``path`` into a :class:`DiskFullError`; re-raise anything else."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = disk_full(e, path)
        if full is not None:
            raise full from e
        raise


def disk_full(error: BaseException, path: str | os.PathLike) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``path`` if ``error`` is a write that ran out of space: ``ENOSPC``, or
    PyTorch's ``[enforce fail at inline_container.cc]`` (its zip writer's wording) with little space left there."""
    import errno
    import shutil
    from pathlib import Path

    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    enospc = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if enospc or ("inline_container" in str(error) and free < 256 * 1024 * 1024):
        return DiskFullError(errno.ENOSPC, f"no space left on {folder} ({free / 1e6:.0f} MB free) while writing "
                             f"{path}; free some space (the previous files are intact) and resume with ckpt_path=last")
    return None


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
