"""The code blocks of README.md and docs/*.md, and how tests/test_docs.py runs each.

Every fenced block is one of:

* ```` ```python ````: run, in order, in one Python process per document
  (later blocks see earlier blocks' names), with a zeotwist server listening
  where the docs say (``localhost:8100``, ``/tmp/zeosocket``; see
  :data:`SUBSTITUTIONS`);
* ```` ``` ````, ```` ```sh ````, ```` ```shell ````: shell commands, run
  with bash (``set -e``), each block must exit 0;
* ```` ```text ````, ```` ```zconfig ````, ```` ```output ````: text that
  is not a command (a configuration file, a program's output, a diagram);
  not run.

A marker comment on the line just before the opening fence changes that
(invisible on GitHub)::

    <!-- doc-test: skip REASON -->      not run; REASON is required
    <!-- doc-test: file NAME -->        the block's text is written to NAME
                                        (in the test's folder) for later blocks
    <!-- doc-test: server -->           shell commands that run a server in the
                                        foreground: each is started, must come to
                                        listen, and the last one keeps serving the
                                        document's later blocks
    <!-- doc-test: process -->          a Python block run alone in a fresh process
                                        (a reactor program: task.react exits)

Indented code blocks are refused (a fenced block says what it is).
Pure: reads files, runs nothing.
"""
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON, SHELL, TEXT = "python", "shell", "text"
LANGUAGES = {"python": PYTHON, "": SHELL, "sh": SHELL, "shell": SHELL, "bash": SHELL,
             "text": TEXT, "zconfig": TEXT, "output": TEXT}
MARKERS = ("skip", "file", "server", "process")

_FENCE = re.compile(r"^(\s*)```\s*([\w-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(\w+)\s*(.*?)\s*-->\s*$")
_LIST_ITEM = re.compile(r"^\s*([*+-]|\d+[.)])\s")


@dataclass
class Block:
    path: str          # relative to the repository
    line: int          # of the opening fence
    language: str      # as written after the fence
    kind: str          # PYTHON, SHELL or TEXT
    text: str
    marker: str = ""   # one of MARKERS, or ""
    argument: str = ""

    @property
    def where(self) -> str:
        return "%s:%d" % (self.path, self.line)


def documents() -> list[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path``; ValueError for an unknown language or
    marker, or an unclosed fence."""
    lines = path.read_text().split("\n")
    found, i = [], 0
    name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, language = len(m.group(1)), m.group(2).lower()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError("%s:%d: unclosed ``` block" % (name, i + 1))
        if language not in LANGUAGES:
            raise ValueError("%s:%d: unknown block language %r (known: %s)"
                             % (name, i + 1, language, ", ".join(sorted(LANGUAGES))))
        text = "\n".join(_dedent(l, indent) for l in lines[i + 1:end]) + "\n"
        block = Block(name, i + 1, language, LANGUAGES[language], text)
        marker = _MARKER.match(lines[i - 1]) if i else None
        if marker:
            block.marker, block.argument = marker.group(1), marker.group(2)
            if block.marker not in MARKERS:
                raise ValueError("%s:%d: unknown doc-test marker %r (known: %s)"
                                 % (name, i, block.marker, ", ".join(MARKERS)))
            if block.marker in ("skip", "file") and not block.argument:
                raise ValueError("%s:%d: doc-test: %s needs %s" % (
                    name, i, block.marker, "a reason" if block.marker == "skip" else "a name"))
        found.append(block)
        i = end + 1
    return found


def _dedent(line: str, indent: int) -> str:
    """``line`` without the fence's indentation (a block inside a list item)."""
    return line[indent:] if line[:indent].strip() == "" else line.lstrip()


def indented_code(path: Path) -> list[int]:
    """Line numbers where an indented (unfenced) code block starts."""
    lines = path.read_text().split("\n")
    starts, in_fence, last_text = [], False, ""
    for n, line in enumerate(lines, 1):
        if _FENCE.match(line) or (in_fence and line.strip() == "```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if line.startswith("    ") and line.strip() and n > 1 and not lines[n - 2].strip() \
                and not _LIST_ITEM.match(last_text) and not last_text.startswith((" ", "|")):
            starts.append(n)
        if line.strip():
            last_text = line
    return starts
