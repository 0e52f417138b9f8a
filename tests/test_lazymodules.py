"""The modules ``zeotwist serve`` leaves to their first use
(zeotwist.server.footprint.LAZY_MODULES, zeotwist.lazymodules) still work
when something uses them: each case runs in a fresh interpreter that defers
them as the server does, before Twisted is imported, and checks that the
module had not run before that use (docs/performance.md, "Memory").  That a
plain server never loads them is tests/test_serve.py's."""
import subprocess
import sys
import textwrap


#: run first in each child
PRELUDE = """
import sys
from zeotwist.server.footprint import defer_unused
from zeotwist.lazymodules import loaded
defer_unused()
from twisted.internet import reactor
"""


def run(code: str) -> list:
    done = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split()


def test_html_unescape_reads_the_entity_table_at_its_first_use():
    assert run("""
        import html
        print(loaded("html.entities") is None)
        print(html.unescape("&amp;&notin;&Aacute;&#38;&notit;x").encode("unicode_escape").decode())
        print(loaded("html.entities") is not None)
        """) == ["True", r"&\u2209\xc1&\xacit;x", "True"]


def test_decimal_and_amps_decimal_argument_work_once_used():
    assert run("""
        import decimal
        from twisted.protocols import amp
        print(loaded("decimal") is None)
        argument = amp.Decimal()
        print(argument.fromString(argument.toString(decimal.Decimal("1.25")) ) + 1)
        print(type(sys.modules["decimal"]).__name__)
        """) == ["True", "2.25", "module"]


def test_a_reactor_run_in_the_main_thread_reaps_what_it_spawns():
    """The reactor reaps children when it starts and at each SIGCHLD:
    without a process spawned that loads nothing; a spawned one is reaped."""
    assert run("""
        from twisted.internet import protocol

        class Ended(protocol.ProcessProtocol):
            def processEnded(self, reason):
                print("ended", reason.value.exitCode)
                reactor.stop()

        def spawn():
            print(loaded("twisted.internet.process") is None)
            reactor.spawnProcess(Ended(), sys.executable,
                                 [sys.executable, "-c", "raise SystemExit(3)"], env=None)
        reactor.callWhenRunning(spawn)
        reactor.run()
        """) == ["True", "ended", "3"]


def test_the_reactor_listens_on_unix_sockets_and_udp_once_asked(tmp_path):
    path = str(tmp_path / "s")
    assert run("""
        from twisted.internet import protocol
        print(loaded("twisted.internet.unix") is None, loaded("twisted.internet.udp") is None,
              loaded("twisted.python.filepath") is None)
        port = reactor.listenUNIX(%r, protocol.Factory.forProtocol(protocol.Protocol))
        udp = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        print(type(port).__module__, type(udp).__module__)
        print(port.getHost().name == %r.encode(), port.getHost())
        """ % (path, path)) == ["True", "True", "True", "twisted.internet.unix",
                                "twisted.internet.udp", "True", "UNIXAddress(%r)" % path]


def test_amps_path_argument_reads_a_filepath_once_used():
    assert run("""
        from twisted.protocols import amp
        print(loaded("twisted.python.filepath") is None)
        print(type(amp.Path().fromString(b"/tmp")).__name__)
        """) == ["True", "FilePath"]


def test_twisteds_plugin_discovery_finds_modules_through_the_stand_in():
    assert run("""
        from twisted.plugin import getModule
        print(loaded("twisted.python.modules") is None)
        print(getModule("twisted.internet").name)
        """) == ["True", "twisted.internet"]


def test_find_spec_answers_for_a_module_not_used_yet():
    """Libraries look for optional modules with ``importlib.util.find_spec``:
    a stand-in answers with the real module's spec (it raised ValueError,
    ``decimal.__spec__ is None``), and that runs nothing."""
    assert run("""
        import importlib.util
        spec = importlib.util.find_spec("decimal")
        print(spec.name, loaded("decimal") is None)
        print(importlib.util.find_spec("html.entities").name)
        import decimal
        print(decimal.Decimal("1.5") * 2, loaded("decimal") is not None)
        """) == ["decimal", "True", "html.entities", "3.0", "True"]
