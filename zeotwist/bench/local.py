"""The ``local FS`` column: some cases against a FileStorage in the client process.

The issue-10 table compares both systems with ZODB on a local FileStorage,
no network: what the network layer costs at all.  In every round, after the
servers, each case of :data:`LOCAL_CASES` that was selected runs once more
in a fresh client process whose storage is ``FileStorage(copy)`` on a fresh
copy of the populated database (system ``local`` in
:mod:`zeotwist.bench.workload`): the same loops, timed the same way.  No
server, so no server RSS; the report shows the local rate beside the
ratio.  ``--no-local`` leaves it out.
"""
import os

#: Cases whose workload runs unchanged over a local storage.
LOCAL_CASES = ("cold", "warm", "graph", "commits", "add1000", "bigrecord")


class LocalTarget:
    """Stands where a bench server would: the client opens ``address`` itself."""

    system = "local"
    process = None

    def __init__(self, filename: str):
        self.address = filename

    def check(self) -> None:
        """Nothing to die."""


def local_round(tmp: str, oidfile: str, settings, directory: str) -> dict:
    """``{row: result}`` of the selected local cases, on one fresh copy."""
    from zeotwist.bench import runner
    from zeotwist.bench.clients import client
    cases = [c for c in LOCAL_CASES if c in settings.cases]
    if not cases:
        return {}
    os.makedirs(directory, exist_ok=True)
    target = LocalTarget(runner.fresh_copy(os.path.join(tmp, "base.fs"), directory,
                                           "local.fs"))
    got = {}
    for case in cases:
        result = client(target, case, oidfile, runner.case_params(settings, case))
        got.update(result.get("rows") or {case: result})
    return got
