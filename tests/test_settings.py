"""ServerSettings: the one definition of the server's options.

Pure logic, in memory: every field is reachable from the command line and
from the ``<zeotwist>`` section (so an option added without its schema line
fails here), and the precedence default < file < command line.
"""
import pytest

from zeotwist.server.config import load_schema
from zeotwist.server.settings import (
    DEFAULT_LISTEN, FLAG, LIST, ServerSettings, cli_name, file_keys, layered, option_fields)
from zeotwist.server.tap import Options, ServerService


def schema_keys() -> set:
    section = load_schema().gettype("zeotwist")
    return {name.replace("-", "_") for name, _info in section}


def test_every_field_is_on_the_command_line_and_in_the_schema():
    options = Options()
    long_names = {o[0] for o in options.longOpt} | {o.rstrip("=") for o in options.longOpt}
    keys = schema_keys()
    for f in option_fields():
        assert cli_name(f) in long_names, f.name
        assert set(file_keys(f)) <= keys, f.name
    # ... and the schema has no <zeotwist> key that no field reads
    read = {k for f in option_fields() for k in file_keys(f)}
    assert keys == read


def test_defaults_and_listen_default():
    s = ServerSettings()
    assert s.listen == [DEFAULT_LISTEN] and s.read_only is False
    assert ServerSettings(listen_tls=["tcp:0"]).listen == []     # TLS only: no plain default
    assert s["transaction_timeout"] == 60 and dict(**s)["handshake_timeout"] == 5
    with pytest.raises(KeyError):
        s["nope"]
    with pytest.raises(TypeError):
        ServerSettings(nope=1)


def test_layers_command_line_over_file_over_default():
    file = {"transaction_timeout": 7.0, "listen": ["tcp:1"], "conflict_classes": ["a.*"]}
    cli = {"listen": ["tcp:2"], "conflict_classes": ["b.C"], "read_only": True}
    s = layered(file, cli)
    assert s.transaction_timeout == 7.0 and s.read_only is True
    assert s.listen == ["tcp:2"]                           # replaced
    assert s.conflict_classes == ["a.*", "b.C"]            # extended
    assert layered({}, {}).listen == [DEFAULT_LISTEN]


def test_problems():
    assert "max-connections must be at least 1" in ServerSettings(max_connections=0).problem()
    assert "needs --tls-cert" in ServerSettings(listen_tls=["tcp:0"]).problem()
    assert ServerSettings().problem() is None


def test_command_line_spelling_from_the_fields():
    options = Options()
    options.parseOptions(["-l", "tcp:1", "--listen", "tcp:2", "-r",
                          "--max-transaction-size", "1MB", "--transaction-timeout", "0"])
    s = options.settings
    assert s.listen == ["tcp:1", "tcp:2"] and s.read_only is True
    assert s.max_transaction_bytes == 2**20
    assert s.transaction_timeout == 0                      # given, even though falsy
    flags = {cli_name(f) for f in option_fields(FLAG)}
    lists = {cli_name(f) for f in option_fields(LIST)}
    assert "read-only" in flags and {"listen", "allow-conflict-class"} <= lists


def test_service_reads_the_settings(tmp_path):
    settings = ServerSettings(read_only=True, handshake_timeout=2.0)
    svc = ServerService(str(tmp_path / "d.fs"), ["tcp:0"], settings=settings,
                        max_connections=5)
    assert svc.settings.read_only and svc.settings.max_connections == 5
    assert svc.listen == ["tcp:0"] and svc.handshake_timeout == 2.0
    assert settings.max_connections != 5                  # the given object is not changed
    with pytest.raises(AttributeError):
        svc.no_such_option
    with pytest.raises(ValueError, match="needs --tls-cert"):
        ServerService(str(tmp_path / "d.fs"), listen_tls=["tcp:0"])
