"""MkDocs hook: the configuration reference, generated from ``conf/`` at every build so it cannot drift.

Every config group (a folder of ``conf/``), every option (a ``.yaml`` file in it), every key with its default and
its comment (the comment lines just above the key, or the comment at the end of its line). The page is added to the
site as ``reference/configuration.md``; ``tests/test_docs.py`` checks that every key of every file is in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"
PAGE = "reference/configuration.md"
# a key is anything up to the first ": " (label maps have keys like "CD4+/CD45RA+/CD25- Naive T"); list items ("- ")
# are not keys
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[^\s#:\-'\"][^#:]*?|[^\s#:\-'\"]):(?=\s|$)(?P<value>[^#]*?)"
                  r"(?:\s+#\s?(?P<comment>.*))?$")


@dataclass
class Entry:
    key: str        # dotted path within the file, e.g. unknown.target_accuracy
    default: str    # as written in the file ('' for a mapping)
    comment: str


def parse_yaml_with_comments(text: str) -> tuple[str, list[Entry]]:
    """(the file's leading comment, its keys) from a Hydra config, line by line (PyYAML drops comments)."""
    header: list[str] = []
    pending: list[str] = []
    stack: list[tuple[int, str]] = []
    entries: list[Entry] = []
    in_header = True
    inline_col = -1  # column of the last key's end-of-line comment: aligned comment lines below continue it
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            note = stripped.lstrip("#").strip()
            if note.startswith("@package"):
                continue
            if in_header:
                header.append(note)
            elif entries and line.index("#") == inline_col:
                entries[-1].comment += " " + note
            else:
                pending.append(note)
            continue
        in_header = False
        match = _KEY.match(line)
        if not stripped or not match:
            pending, inline_col = [], -1  # a blank line or a list item ends the comment above
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        comment = " ".join([*pending, *([match["comment"]] if match["comment"] else [])])
        entries.append(Entry(".".join(k for _, k in stack), match["value"].strip(), comment))
        inline_col = line.find("#", match.end("value")) if match["comment"] else -1
        pending = []
    return "\n".join(header), entries


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _option(path: Path, heading: str) -> list[str]:
    header, entries = parse_yaml_with_comments(path.read_text())
    out = [f"{heading} `{path.relative_to(CONF).as_posix()}`", ""]
    if header:
        out += ["```text", header, "```", ""]
    rows = [e for e in entries if e.key != "defaults"]
    if rows:
        out += ["| key | default | comment |", "|---|---|---|"]
        out += [f"| `{e.key}` | {'`' + _cell(e.default) + '`' if e.default else ''} | {_cell(e.comment)} |"
                for e in rows]
        out.append("")
    return out


def render(conf: Path = CONF) -> str:
    """The whole reference page as Markdown."""
    out = ["# Configuration reference", "",
           "Generated from `conf/` when the site is built: every group, every option, every key with its default "
           "and its comment. Pick an option with `group=option` (`python train.py data=h5ad`), set a key with "
           "`group.key=value` (`python train.py lora.r=4`).", ""]
    for top in sorted(conf.glob("*.yaml")):
        out += _option(top, "## Top level:")
    for group in sorted(p for p in conf.rglob("*") if p.is_dir()):
        files = sorted(group.glob("*.yaml"))
        if not files:
            continue
        name = group.relative_to(conf).as_posix()
        out += [f"## Group `{name}`", "", "Options: " + ", ".join(f"`{name}={f.stem}`" for f in files), ""]
        for f in files:
            out += _option(f, "###")
    return "\n".join(out) + "\n"


def on_files(files, config):  # noqa: ANN001 - MkDocs' hook signature
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files
