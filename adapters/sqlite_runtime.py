"""The SQLite library as the `sqlite3` module loaded it: settings of the whole process."""

from __future__ import annotations

import ctypes
import importlib.util

_SQLITE_OK = 0
_SQLITE_CONFIG_MEMSTATUS = 9

_disabled = False


def disable_memory_statistics() -> bool:
    """Turns off SQLite's memory statistics for this process; returns whether they are off.

    With them on (the library's default) every allocation of every connection takes one
    process-wide mutex, so database threads that build strings (framing a page of the log,
    inserting rows from a JSON array) wait on each other instead of running on their cores:
    two threads framing pages took twice as long as one, and five times as long as two
    without the statistics. Nothing here reads them.

    The library must be shut down to change the setting, which is only safe while no
    connection is open: call this first thing. When SQLite reports memory in use (a
    connection is open) or the library cannot be reached, nothing changes and it returns
    False; the statistics then stay on, which only costs speed. When they are off already
    (a library built so, or set before), a probe allocation is not counted, and nothing is
    shut down.
    """
    global _disabled
    if _disabled:
        return True
    spec = importlib.util.find_spec("_sqlite3")
    if spec is None or spec.origin is None:
        return False
    try:
        # the extension module's own handle resolves to the very library it is linked with
        lib = ctypes.CDLL(spec.origin)
        memory_used = lib.sqlite3_memory_used
    except (OSError, AttributeError):
        return False
    memory_used.restype = ctypes.c_int64
    if memory_used() != 0:
        return False
    lib.sqlite3_malloc.restype = ctypes.c_void_p
    lib.sqlite3_free.argtypes = [ctypes.c_void_p]
    probe = lib.sqlite3_malloc(64)
    counted = memory_used()
    lib.sqlite3_free(probe)
    if probe and counted == 0:
        _disabled = True  # nothing is counted: a zero above said nothing about connections
        return True
    if lib.sqlite3_shutdown() != _SQLITE_OK:
        return False
    configured = lib.sqlite3_config(ctypes.c_int(_SQLITE_CONFIG_MEMSTATUS), ctypes.c_int(0))
    initialized = lib.sqlite3_initialize()
    _disabled = bool(configured == _SQLITE_OK and initialized == _SQLITE_OK)
    return _disabled
