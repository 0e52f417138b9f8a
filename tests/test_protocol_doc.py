"""docs/protocol.md must not drift from zeotwist/wire: one section per command
in ALL_COMMANDS (and none for a command that does not exist), naming every
argument and response field, the direction and one-way-ness; every error
code; the protocol version and the limits the code enforces.
"""
import pathlib
import re

import pytest

from zeotwist.server import session
from zeotwist.wire import commands, framing
from zeotwist.wire.codes import ERRORS

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def command_sections(text: str) -> dict:
    """``### Name`` heading -> the text up to the next heading of level <= 3."""
    sections = {}
    parts = re.split(r"^(#{1,3}) +(.+?) *$", text, flags=re.M)
    # parts: [before, hashes, title, body, hashes, title, body, ...]
    for hashes, title, body in zip(parts[1::3], parts[2::3], parts[3::3]):
        if hashes == "###":
            sections[title.strip("` ")] = body
    return sections


def names(fields) -> list[str]:
    return [name.decode("ascii") for name, _ in fields]


@pytest.mark.parametrize("command", commands.ALL_COMMANDS, ids=lambda c: c.__name__)
def test_each_command_is_documented(doc, command):
    sections = command_sections(doc)
    name = command.commandName.decode("ascii")
    assert name in sections, "docs/protocol.md has no '### %s' section" % name
    body = sections[name]
    for field in names(command.arguments):
        assert "`%s`" % field in body, "%s: argument %s not documented" % (name, field)
    for field in names(getattr(command, "response", [])):
        assert "`%s`" % field in body, "%s: response field %s not documented" % (name, field)
    direction = ("Server → client" if command in commands.SERVER_COMMANDS
                 else "Client → server")
    assert direction in body, "%s: direction not stated" % name
    one_way = "**one-way**" in body
    assert one_way == (not command.requiresAnswer), "%s: one-way-ness wrong" % name


def test_no_section_for_a_command_that_does_not_exist(doc):
    documented = set(command_sections(doc))
    real = {c.commandName.decode("ascii") for c in commands.ALL_COMMANDS}
    # Every '###' heading under the two command chapters must be a real command.
    chapters = re.split(r"^## ", doc, flags=re.M)
    command_chapters = [c for c in chapters if c.startswith("Commands:")]
    assert len(command_chapters) == 2
    headings = {h.strip("` ") for c in command_chapters
                for h in re.findall(r"^### +(.+?) *$", c, flags=re.M)}
    assert headings == real
    assert real <= documented


def test_every_error_code_is_documented(doc):
    for code in set(ERRORS.values()):
        assert "`%s`" % code.decode("ascii") in doc, code


def test_version_and_limits(doc):
    assert "`%s`" % commands.PROTOCOL_VERSION in doc
    assert "%s MiB" % (framing.SERVER_MAX_BOX_BYTES // 2**20) in doc
    assert "{:,}".format(framing.SERVER_MAX_BOX_BYTES) in doc
    assert "at most %d keys" % framing.SERVER_MAX_BOX_KEYS in doc
    assert "{:,} keys".format(framing.CLIENT_MAX_BOX_KEYS) in doc
    assert "{:,}".format(commands.STORE_CHUNK) in doc
    assert "at most %d" % session.MAX_NEW_OIDS in doc
