"""A child process that fsyncs the spool's write-ahead log when the gateway asks.

An fsync blocks the thread that calls it until the disk has the data (0.2 ms typically on
the machines measured, 1 ms at p99), and costs CPU besides (the block device's requests).
On the gateway's event loop that stalls every call in flight; on a thread of the gateway,
the thread needs the interpreter lock before and after, which the busy loop holds. A
process of its own has neither problem: the loop writes one byte to a pipe and goes on;
the worker fsyncs and answers with one byte, which the loop reads when it next polls.

Protocol: the parent writes a byte when it wants an fsync and never has more than one
request open (the first, at start, shows the worker is ready and can fsync the file); the
worker answers each read of the request pipe with one fsync and one reply byte, 0 when the
fsync succeeded, else the error number (255 when it does not fit).
The worker stops when the request pipe reaches end of file, which is when the gateway
closes it or dies. It ignores SIGINT and SIGTERM: the gateway decides when it stops, and
meanwhile still needs its fsyncs.

``FsyncWorker`` is the gateway's side: it starts the worker (this file, run by path with
the descriptors inherited: ``python FILE LOG_FD REQUESTS_FD REPLIES_FD``), sends requests
and reads the replies on the event loop. The worker runs this file with nothing imported
but ``os``, ``signal`` and ``sys`` (the gateway's side imports what it needs where it
uses it), so it starts in tens of milliseconds and stays at about 10 MB.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio
    import subprocess
    from collections.abc import Callable

START_SECONDS = 10.0
STOP_SECONDS = 2.0


def serve(log_fd: int, requests: int, replies: int) -> None:
    while os.read(requests, 4096):
        try:
            os.fsync(log_fd)
            reply = 0
        except OSError as exc:
            reply = exc.errno if exc.errno and 0 < exc.errno < 255 else 255
        os.write(replies, bytes((reply,)))


class FsyncWorker:
    """The gateway's handle on its fsync worker. ``request`` asks for one fsync of
    ``log_fd`` (one at a time); ``on_done`` gets None or the ``OSError`` of each, on the
    loop; ``on_gone`` is called once if the worker stops answering (it exited or was
    killed), after which ``request`` returns False and the caller fsyncs by itself."""

    def __init__(self, log_fd: int, on_done: Callable[[OSError | None], None], on_gone: Callable[[], None]) -> None:
        self.log_fd = log_fd
        self.on_done = on_done
        self.on_gone = on_gone
        self.alive = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: subprocess.Popen | None = None
        self._requests: int | None = None  # the write end of the request pipe
        self._replies: int | None = None  # the read end of the reply pipe

    def start(self, loop: asyncio.AbstractEventLoop) -> "FsyncWorker":
        import subprocess

        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__, str(self.log_fd), str(request_r), str(reply_w)],
                pass_fds=(self.log_fd, request_r, reply_w), stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(request_w)
            os.close(reply_r)
            raise
        finally:  # the worker's ends, which it holds now
            os.close(request_r)
            os.close(reply_w)
        self._requests, self._replies = request_w, reply_r
        try:
            self._first_fsync()
        except BaseException:
            self.stop()
            raise
        os.set_blocking(reply_r, False)
        self._loop = loop
        loop.add_reader(reply_r, self._readable)
        self.alive = True
        return self

    def _first_fsync(self) -> None:
        """One fsync, waited for here: the worker has started, set its signals, and can
        fsync the file (``OSError`` otherwise)."""
        import select

        assert self._requests is not None and self._replies is not None
        os.write(self._requests, b"s")
        ready, _, _ = select.select([self._replies], [], [], START_SECONDS)
        reply = os.read(self._replies, 1) if ready else b""
        if reply != b"\0":
            raise OSError(reply[0], os.strerror(reply[0])) if reply else OSError(
                "the fsync worker did not answer its first request")

    def request(self) -> bool:
        """Ask for an fsync; False when the worker is gone (nothing was asked)."""
        if not self.alive or self._requests is None:
            return False
        try:
            os.write(self._requests, b"s")
        except OSError:  # the worker exited: its end of the pipe is closed
            self._gone()
            return False
        return True

    def _readable(self) -> None:
        assert self._replies is not None
        try:
            replies = os.read(self._replies, 64)
        except BlockingIOError:
            return
        except OSError:
            replies = b""
        if not replies:
            self._gone()
            return
        for reply in replies:
            self.on_done(None if reply == 0 else OSError(reply, os.strerror(reply)))

    def _gone(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self._unwatch()
        self.on_gone()

    def _unwatch(self) -> None:
        if self._loop is not None and self._replies is not None:
            self._loop.remove_reader(self._replies)
            self._loop = None

    def stop(self) -> None:
        """Close the request pipe (the worker exits at its end) and wait for the worker."""
        self.alive = False
        self._unwatch()
        for fd in (self._requests, self._replies):
            if fd is not None:
                os.close(fd)
        self._requests = self._replies = None
        if self._process is not None:
            import subprocess

            try:
                self._process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:  # stuck in an fsync of a failing disk
                self._process.kill()  # takes effect when the fsync returns; not waited for
                try:
                    self._process.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
            self._process = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log_fd, requests, replies = (int(arg) for arg in argv[1:4])
    try:
        serve(log_fd, requests, replies)
    except BrokenPipeError:  # the gateway went away while an fsync ran
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
