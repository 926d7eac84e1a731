"""Finishing the active run when the interpreter exits, with the right exit code.

Installed once per process, chaining whatever was there before:

- ``sys.excepthook``: an uncaught exception means exit code 1 (130 for Ctrl-C);
- ``sys.exit``: records the code, when called in the main thread (in another thread it
  ends only that thread);
- ``atexit``: finishes the active run with the code recorded (0 on a normal exit);
- SIGTERM, only while its disposition is the default: finishes the active run with
  143 (so a run marked preempting ends ``preempted``), then dies of SIGTERM as before.

The ``__main__`` module's frame tells how the script ended: at its final return (exit
code 0, whatever ``SystemExit`` was raised and swallowed on the way), or early. An early
end with no code recorded and no uncaught error was a ``raise SystemExit(n)`` without
``sys.exit``: its code cannot be read and is reported as unknown (``None``).
"""

from __future__ import annotations

import atexit
import dis
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger("preemptwatch.client")

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM

_lock = threading.Lock()
_installed_pid: int | None = None
_exit_code: int | None = None
_on_exit: Callable[[int | None], None] | None = None
_main_frame: FrameType | None = None
_saved: dict[str, Any] = {}


def _record(status: Any) -> None:
    global _exit_code
    if threading.current_thread() is threading.main_thread():
        _exit_code = exit_code_of(status)


def exit_code_of(status: Any) -> int:
    """The process exit code ``sys.exit(status)`` gives."""
    if status is None:
        return 0
    if isinstance(status, bool):
        return int(status)
    if isinstance(status, int):
        return status & 0xFF if status >= 0 else (256 + status) & 0xFF
    return 1


def recorded_exit_code() -> int | None:
    """The exit code the process is ending with, as far as the hooks saw; None when the
    main module was ended by a ``SystemExit`` whose code could not be seen."""
    ended_early = _main_ended_early()
    if ended_early is False:
        return 0
    if _exit_code is not None:
        return _exit_code
    last = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    if last is not None and not isinstance(last, SystemExit):
        return 130 if isinstance(last, KeyboardInterrupt) else 1
    return None if ended_early else 0


def _find_main_frame() -> FrameType | None:
    """The ``__main__`` module's frame, when the caller runs inside it (main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__":
            return frame
        frame = frame.f_back
    return None


def _main_ended_early() -> bool | None:
    """Whether the ``__main__`` frame stopped somewhere other than its final return;
    None when that frame is unknown (the run started outside the main thread)."""
    frame = _main_frame
    if frame is None:
        return None
    try:
        opname = dis.opname[frame.f_code.co_code[frame.f_lasti]]
    except (IndexError, ValueError):
        return None
    return not opname.startswith("RETURN")


def install(on_exit: Callable[[int | None], None]) -> None:
    """Call ``on_exit(code)`` once when the process ends (idempotent per process);
    ``code`` is None when it could not be seen (see `recorded_exit_code`)."""
    global _installed_pid, _on_exit, _exit_code, _main_frame
    with _lock:
        _on_exit = on_exit
        _main_frame = _main_frame or _find_main_frame()
        if _installed_pid == os.getpid():
            return
        _installed_pid = os.getpid()
        _exit_code = None
        _wrap_excepthook()
        _wrap_sys_exit()
        atexit.register(_at_exit)
    install_sigterm()


def uninstall() -> None:
    """Undo `install` where nothing was installed over our hooks since."""
    global _installed_pid, _on_exit, _exit_code, _main_frame
    with _lock:
        if _installed_pid != os.getpid():
            return
        atexit.unregister(_at_exit)
        if getattr(sys.excepthook, "__wrapped_by_preemptwatch__", False):
            sys.excepthook = _saved["excepthook"]
        if getattr(sys.exit, "__wrapped_by_preemptwatch__", False):
            sys.exit = _saved["exit"]
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGTERM) is _on_sigterm
        ):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _installed_pid = _on_exit = _exit_code = _main_frame = None


def install_sigterm() -> None:
    """Take over SIGTERM if nothing but the default action handles it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError) as exc:  # pragma: no cover - exotic platforms
        log.debug("cannot watch SIGTERM: %r", exc)


def _wrap_excepthook() -> None:
    previous = _saved["excepthook"] = sys.excepthook

    def excepthook(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        global _exit_code
        _exit_code = 130 if issubclass(exc_type, KeyboardInterrupt) else 1
        previous(exc_type, exc, tb)

    excepthook.__wrapped_by_preemptwatch__ = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook


def _wrap_sys_exit() -> None:
    previous = _saved["exit"] = sys.exit

    def exit(status: Any = None) -> Any:
        _record(status)
        return previous(status)

    exit.__doc__ = previous.__doc__
    exit.__wrapped_by_preemptwatch__ = True  # type: ignore[attr-defined]
    sys.exit = exit


def _at_exit() -> None:
    if _installed_pid != os.getpid() or _on_exit is None:
        return  # a forked child: the run belongs to the parent
    try:
        _on_exit(recorded_exit_code())
    except Exception:
        log.exception("preemptwatch: could not finish the run at exit")


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Finish the run as killed by SIGTERM, then die of it (only when we are the handler;
    called through another handler's chain, that handler decides)."""
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        return
    if _installed_pid == os.getpid() and _on_exit is not None:
        try:
            _on_exit(SIGTERM_EXIT_CODE)
        except Exception:
            log.exception("preemptwatch: could not finish the run on SIGTERM")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
