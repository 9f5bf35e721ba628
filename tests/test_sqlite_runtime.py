"""SQLite's memory statistics, turned off for the process before any database is opened."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = """
    import ctypes, importlib.util, sqlite3
    from adapters.sqlite_runtime import disable_memory_statistics

    lib = ctypes.CDLL(importlib.util.find_spec("_sqlite3").origin)
    lib.sqlite3_memory_used.restype = ctypes.c_int64

    def used_with_a_connection():
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        try:
            return lib.sqlite3_memory_used()
        finally:
            conn.close()
"""


def run(script: str) -> list[str]:
    """Runs `script` after PROBE in a fresh interpreter (the setting is per process)."""
    code = textwrap.dedent(PROBE) + textwrap.dedent(script)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_statistics_are_on_by_default_and_off_once_disabled() -> None:
    before, took, after, again = run(
        """
        before = used_with_a_connection()
        took = disable_memory_statistics()
        print(before, took, used_with_a_connection(), disable_memory_statistics())
        """
    )
    assert int(before) > 0  # counted: every allocation goes through the statistics mutex
    assert took == "True"
    assert int(after) == 0  # no longer counted
    assert again == "True"


def test_an_open_connection_keeps_the_library_as_it_is() -> None:
    """Shutting SQLite down under an open connection is undefined: the setting is refused."""
    took, used, rows = run(
        """
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (x)")
        took = disable_memory_statistics()
        conn.execute("INSERT INTO t VALUES (1)")
        rows = conn.execute("SELECT count(*) FROM t").fetchone()[0]
        print(took, used_with_a_connection() > 0, rows)
        """
    )
    assert (took, used, rows) == ("False", "True", "1")


def test_statistics_already_off_are_left_alone_even_with_a_connection_open() -> None:
    """Off, SQLite reports no memory in use with a connection open: that zero proves nothing,
    so the library must not be shut down under the connection. A shutdown would also forget
    the registered auto-extension, which every new connection runs."""
    took, rows, runs = run(
        """
        lib.sqlite3_shutdown()
        lib.sqlite3_config(ctypes.c_int(9), ctypes.c_int(0))  # off, as a build can have it
        lib.sqlite3_initialize()
        runs = []
        ENTRY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
        entry = ENTRY(lambda db, error, api: runs.append(db) or 0)
        lib.sqlite3_auto_extension(entry)
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (x)")
        took = disable_memory_statistics()
        conn.execute("INSERT INTO t VALUES (1)")
        sqlite3.connect(":memory:").close()
        print(took, conn.execute("SELECT count(*) FROM t").fetchone()[0], len(runs))
        """
    )
    assert (took, rows, runs) == ("True", "1", "2")
