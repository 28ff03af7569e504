"""The adapters a base is served with, recorded in a file that every worker and the next start read.

With the admin endpoint on (``SCIMILARITY_LORA_ADMIN_TOKEN``), an add or remove changes the worker that received it
and then rewrites this file (atomically: temp file + rename); every other worker notices the new modification time
on its next request (one ``stat`` per request, microseconds) and brings its own set in line before answering, and
a restarted worker starts from it. So all workers serve the same set, and a restart forgets nothing. The file lives
in ``SCIMILARITY_LORA_STATE_DIR`` (default ``$BENTOML_HOME/scimilarity_lora_served/``), one per base; delete it to
go back to serving every adapter of the base in the store.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    home = os.environ.get("BENTOML_HOME") or os.path.join(os.path.expanduser("~"), "bentoml")
    return Path(os.environ.get("SCIMILARITY_LORA_STATE_DIR") or os.path.join(home, "scimilarity_lora_served"))


class ServedSetFile:
    def __init__(self, base_sha256: str, directory: str | Path | None = None) -> None:
        self.path = Path(directory or default_state_dir()) / f"{base_sha256[:16]}.json"
        self.seen_mtime: float | None = None

    def mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns / 1e9
        except OSError:
            return None

    def read(self) -> list[str] | None:
        """The recorded adapter tags, or None (no file, or one that cannot be read: said once in the log)."""
        try:
            tags = json.loads(self.path.read_text())["adapters"]
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ValueError("'adapters' is not a list of model tags")
            return tags
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the served-adapter record %s: %s", self.path, e)
            return None

    def write(self, tags: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".served-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump({"adapters": sorted(tags)}, fh)
        os.replace(tmp, self.path)
        self.seen_mtime = self.mtime()

    def changed(self) -> bool:
        """Has another worker rewritten the file since this one last read or wrote it?"""
        mtime = self.mtime()
        return mtime is not None and mtime != self.seen_mtime
