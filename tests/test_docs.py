"""Every shell command and Python snippet in README.md and docs/ runs (issue 13, item 12).

Each document is one test: its fenced blocks run in order (the rules and
markers are in tests/docblocks.py) in a fresh folder, against a real
``twistd zeotwist`` in a subprocess.  The addresses and folders the docs use
are moved into the test's folder and onto a free port (:data:`SUBSTITUTIONS`),
so ``localhost:8100``, ``/tmp/zeosocket`` and ``/var/db/data.fs`` in a
snippet work as written without touching the machine.  A block that cannot
run here says why, with a ``doc-test: skip`` marker.
"""
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from docblocks import PYTHON, REPO, SHELL, blocks, documents, indented_code
from zeotwist.testing import start_twistd

#: document text -> test folder: the port, and the absolute folders the docs name
SUBSTITUTIONS = re.compile(r"(?<!\d)8100(?!\d)|/tmp/|/var/(?:db|run|log|cache)/|/etc/zeotwist/")
BLOCK_TIMEOUT = 120.0
READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sandbox:
    """One document's run: its folder, port, servers and Python session."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        for sub in ("tmp", "var/db", "var/run", "var/log", "var/cache", "etc/zeotwist"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for name in ("docs", "tac"):         # commands run "from the source tree"
            (folder / name).symlink_to(REPO / name)
        bin_dir = os.path.dirname(sys.executable)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                        PYTHONPATH=os.pathsep.join(
                            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "")
                                           .split(os.pathsep) if p]))
        self.servers: list = []           # TwistdServer or Popen
        self.session = None

    def substitute(self, text: str) -> str:
        def one(m):
            found = m.group(0)
            return str(self.port) if found == "8100" else str(self.folder) + found
        return SUBSTITUTIONS.sub(one, text)

    # -- servers ------------------------------------------------------------------
    def ensure_server(self) -> None:
        if not self.servers:
            self.servers.append(start_twistd(
                str(self.folder / "data.fs"), "--listen",
                "unix:%s" % (self.folder / "tmp" / "zeosocket"),
                listen="tcp:%d:interface=127.0.0.1" % self.port,
                directory=str(self.folder), env=self.env))

    def start_server_command(self, command: str, where: str) -> None:
        """A foreground server command: stop the previous ones, start it, wait
        until it listens on the port or on its Unix socket."""
        self.stop_servers()
        self.stop_daemons()
        if re.search(r"\bzeotwist\b", command) and not re.search(
                r"(--listen|-l|-C|--config|-y)\b|ZEOTWIST_LISTEN", command):
            command += " --listen tcp:%d:interface=127.0.0.1" % self.port  # not 8100 itself
        process = subprocess.Popen(["bash", "-c", command], cwd=self.folder,
                                   env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append(process)
        sockets = re.findall(r"unix:(?:path=)?([^\s:\"']+)", command)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._listening(sockets):
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop_servers()
                pytest.fail("%s: %r did not come to listen:\n%s" % (
                    where, command, process.stdout.read().decode(errors="replace")))
            time.sleep(0.05)          # polling a real condition, bounded by the deadline

    def _listening(self, sockets) -> bool:
        targets = [(socket.AF_UNIX, path) for path in sockets]
        targets.append((socket.AF_INET, ("127.0.0.1", self.port)))
        for family, address in targets:
            with socket.socket(family) as s:
                s.settimeout(1)
                try:
                    s.connect(address)
                    return True
                except OSError:
                    pass
        return False

    def stop_servers(self) -> None:
        for server in self.servers:
            if isinstance(server, subprocess.Popen):
                if server.poll() is None:
                    os.killpg(server.pid, signal.SIGTERM)
                    try:
                        server.wait(10)
                    except subprocess.TimeoutExpired:
                        os.killpg(server.pid, signal.SIGKILL)
                        server.wait(10)
            else:
                server.stop()
        self.servers = []

    # -- running blocks -------------------------------------------------------------
    def run_shell(self, text: str, where: str) -> None:
        if re.search(r"\btwistd\b", text):          # it starts a server of its own
            self.stop_servers()
            self.stop_daemons()
        else:
            self.ensure_server()
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=self.folder,
                              env=self.env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            pytest.fail("%s: exit status %d\n--- commands ---\n%s--- output ---\n%s%s" % (
                where, done.returncode, text, done.stdout, done.stderr))

    def run_python_alone(self, text: str, where: str) -> None:
        self.ensure_server()
        done = subprocess.run([sys.executable, "-c", text], cwd=self.folder, env=self.env,
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            pytest.fail("%s: exit status %d\n%s%s" % (where, done.returncode, done.stdout,
                                                      done.stderr))

    def run_python(self, text: str, where: str) -> None:
        self.ensure_server()
        if self.session is None:
            self.session = PythonSession(self.folder, self.env)
        error = self.session.run(text, where)
        if error is not None:
            pytest.fail("%s:\n%s\n--- output so far ---\n%s" % (
                where, error, self.session.output()))

    def stop_daemons(self) -> None:
        """Stop the daemons the document's commands started (their pid files)."""
        for pid_file in self.folder.rglob("*.pid"):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (ValueError, OSError):
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.05)      # polling a real condition, bounded by the deadline

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.stop_servers()
        self.stop_daemons()


#: the Python process that runs a document's blocks in one namespace
#: (in __main__'s own namespace, so that classes a block defines can be pickled)
SESSION = r"""
import json as _json, sys as _sys, traceback as _traceback
for _raw in _sys.stdin:
    _block = _json.loads(_raw)
    try:
        exec(compile(_block["text"], _block["where"], "exec"), globals())
        _result = {"ok": True}
    except SystemExit as _e:
        _result = {"ok": _e.code in (None, 0), "error": "SystemExit(%r)" % (_e.code,)}
    except BaseException:
        _result = {"ok": False, "error": _traceback.format_exc()}
    _sys.stderr.flush()
    print("\n@@doc-test@@" + _json.dumps(_result), flush=True)
"""


class PythonSession:
    def __init__(self, folder, env):
        self.process = subprocess.Popen(
            [sys.executable, "-c", SESSION], cwd=folder, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.results: queue.Queue = queue.Queue()
        self.lines: list = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            if line.startswith("@@doc-test@@"):
                self.results.put(json.loads(line[len("@@doc-test@@"):]))
            else:
                self.lines.append(line)
        self.results.put({"ok": False, "error": "the Python process ended"})

    def output(self) -> str:
        return "".join(self.lines[-200:])

    def run(self, text: str, where: str):
        """None, or the error of this block."""
        self.process.stdin.write(json.dumps({"text": text, "where": where}) + "\n")
        self.process.stdin.flush()
        try:
            result = self.results.get(timeout=BLOCK_TIMEOUT)
        except queue.Empty:
            return "no result within %g s" % BLOCK_TIMEOUT
        return None if result["ok"] else result["error"]

    def close(self):
        try:
            self.process.stdin.close()
            self.process.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(10)


def _commands(text: str) -> list[str]:
    """Shell commands, one per logical line (backslash continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [l.strip() for l in joined.split("\n") if l.strip() and not l.strip().startswith("#")]


def run_document(path: Path, folder: Path) -> dict:
    sandbox = Sandbox(folder)
    counts = {"run": 0, "skipped": 0, "text": 0}
    try:
        for block in blocks(path):
            text = sandbox.substitute(block.text)
            if block.marker == "skip":
                counts["skipped"] += 1
            elif block.marker == "file":
                (folder / sandbox.substitute(block.argument)).write_text(text)
                counts["text"] += 1
            elif block.kind == SHELL and block.marker == "server":
                for command in _commands(text):
                    sandbox.start_server_command(command, block.where)
                counts["run"] += 1
            elif block.kind == SHELL:
                sandbox.run_shell(text, block.where)
                counts["run"] += 1
            elif block.kind == PYTHON and block.marker == "process":
                sandbox.run_python_alone(text, block.where)
                counts["run"] += 1
            elif block.kind == PYTHON:
                sandbox.run_python(text, block.where)
                counts["run"] += 1
            else:
                counts["text"] += 1
    finally:
        sandbox.close()
    return counts


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_document_blocks_run(path, tmp_path):
    counts = run_document(path, tmp_path)
    print(path.name, counts)


def test_every_block_is_fenced_and_known():
    """Parsing alone: every block has a known language and marker, no
    indented code block hides a command from the runner."""
    problems = []
    for path in documents():
        try:
            blocks(path)
        except ValueError as e:
            problems.append(str(e))
        for line in indented_code(path):
            problems.append("%s:%d: indented code block: use a fenced one (```python, "
                            "```sh, ```text)" % (path.relative_to(REPO), line))
    assert not problems, "\n".join(problems)


def test_example_servers_listen_on_the_loopback():
    """Issue 13 item 9: a server in a documented block listens on 127.0.0.1
    (or a Unix socket) unless the line says why not: TLS (``listen-tls``,
    made for untrusted networks) or a comment naming every interface."""
    tcp = re.compile(r"\btcp6?:(\d+)((?::[\w=.\[\]]+)*)")
    open_lines = []
    for path in documents():
        for block in blocks(path):
            for n, line in enumerate(block.text.splitlines(), block.line + 1):
                for m in tcp.finditer(line):
                    loopback = re.search(r":interface=(127\.0\.0\.1|::1|\\:\\:1)\b", m.group(2))
                    if loopback or "listen-tls" in line or "every interface" in line:
                        continue
                    if re.search(r"\bhost=", m.group(2)):
                        continue                       # a client endpoint
                    open_lines.append("%s:%d: %s" % (block.path, n, line.strip()))
    assert not open_lines, "\n".join(open_lines)


# -- the rules on their own ----------------------------------------------------------

def _doc(tmp_path, text: str) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(text)
    return path


def test_markers_and_languages(tmp_path):
    found = blocks(_doc(tmp_path, (
        "text\n\n<!-- doc-test: skip it needs a printer -->\n```python\nprint(1)\n```\n\n"
        "* a list item:\n\n  ```sh\n  echo 'in a list'\n  ```\n\n"
        "<!-- doc-test: file a.conf -->\n```zconfig\n<zodb>\n</zodb>\n```\n")))
    assert [(b.kind, b.marker, b.argument) for b in found] == [
        ("python", "skip", "it needs a printer"), ("shell", "", ""), ("text", "file", "a.conf")]
    assert found[1].text == "echo 'in a list'\n"


@pytest.mark.parametrize("text, message", [
    ("```perl\nprint 1\n```\n", "unknown block language 'perl'"),
    ("<!-- doc-test: skip -->\n```\nls\n```\n", "needs a reason"),
    ("<!-- doc-test: maybe -->\n```\nls\n```\n", "unknown doc-test marker 'maybe'"),
    ("```python\nprint(1)\n", "unclosed"),
])
def test_refusals(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        blocks(_doc(tmp_path, text))


def test_indented_code_is_found_but_not_list_continuations(tmp_path):
    path = _doc(tmp_path, "para\n\n    rm -rf build\n\n* item\n\n    more of the item\n")
    assert indented_code(path) == [3]


def test_a_failing_block_fails_its_document(tmp_path):
    """The runner stops at a command that fails, naming the block."""
    docs = tmp_path / "docs"
    docs.mkdir()
    path = docs / "x.md"
    path.write_text("```python\nvalue = 1\n```\n\n```sh\nfalse\n```\n")
    with pytest.raises(pytest.fail.Exception, match="x.md:5: exit status 1"):
        run_document(path, tmp_path / "run")
