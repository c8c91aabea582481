"""Following a session in pbmctl: the live view on a terminal, progress lines off one,
JSON lines with --json, and the operator's keys.

On a terminal the view is redrawn in place (rich Live) while the terminal is in
cbreak mode with echo off: a key acts at once (`p`, `r`) and nothing typed is
echoed into the drawing (an echoed Enter used to leave a copy of the header
behind). The terminal's mode is restored on every way out: the session ends,
Ctrl-C, SIGTERM or SIGHUP, the daemon going away, an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from rich.live import Live

from pbmd.daemon.clients import ctl_view as view
from pbmd.daemon.clients.ctl_client import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SESSION_FAILED,
    Client,
    CtlError,
    DaemonUnreachable,
)

if TYPE_CHECKING:
    from pbmd.daemon.clients.pbmctl import Out

PROGRESS_INTERVAL_S = 5.0
"""Off a terminal, a port's progress line is printed at most this often..."""
PROGRESS_STEP = 0.1
"""...when its progress has crossed a 10 % step since its last line; a new step or
state prints at once."""


class Interrupted(CtlError):
    """pbmctl was told to stop (Ctrl-C, SIGTERM, SIGHUP) while following a session."""

    exit_code = EXIT_INTERRUPTED


@contextlib.contextmanager
def keys_mode(fd: int) -> Iterator[None]:
    """The terminal in cbreak mode with echo off (each key is read as it is pressed,
    nothing is echoed); its previous mode is restored however the block ends."""
    saved = termios.tcgetattr(fd)
    mode = termios.tcgetattr(fd)
    mode[3] &= ~(termios.ECHO | termios.ICANON)  # lflags; ISIG stays: Ctrl-C still works
    mode[6][termios.VMIN] = 1
    mode[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSADRAIN, mode)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class KeyInput:
    """The operator's keys: `p` and `r` act at once; a port number, `abort`, or nothing
    is ended by Enter. ``act(method, params, done)`` sends a command."""

    def __init__(
        self,
        sv: view.SessionView,
        act: Callable[[str, dict[str, Any], str], None],
        say: Callable[[str, str], None],
    ) -> None:
        self.sv = sv
        self.act = act
        self.say = say

    def feed(self, text: str) -> None:
        for ch in text:
            self._key(ch)

    def _key(self, ch: str) -> None:
        typed = self.sv.typed
        if ch in ("\r", "\n"):
            self.sv.typed = ""
            self._line(typed.strip().lower())
        elif ch in ("\x7f", "\b"):
            self.sv.typed = typed[:-1]
        elif not typed and ch.lower() == "p":
            self.act("session.pause", {}, "all ports paused")
        elif not typed and ch.lower() == "r":
            self.act("session.resume", {}, "all ports resumed")
        elif ch == "\x1b":
            self.sv.typed = ""  # Escape: forget what was typed
        elif ch.isprintable():
            self.sv.typed = (typed + ch)[-16:]

    def _line(self, text: str) -> None:
        if text == "":
            waits = view.placement_waits(self.sv.status)
            if not waits:
                self.say("no placement waits for a confirmation", "yellow")
                return
            port, _step, site = waits[0]
            self.act(
                "session.confirm", {"port": port}, f"port {port}: placement at {site} confirmed"
            )
        elif text.isdigit():
            self.act("session.confirm", {"port": int(text)}, f"port {text}: placement confirmed")
        elif text == "abort":
            self.act(
                "session.abort", {"reason": "aborted by operator at pbmctl"}, "session aborted"
            )
        else:
            self.say(f"unknown input {text!r} (p, r, a port number, abort)", "yellow")


class ProgressLines:
    """Off a terminal: a compact line per port when its step or state changes, and when
    its progress crosses a 10 % step (at most every `PROGRESS_INTERVAL_S` per port), so
    a log shows the session moving without a line per telemetry sample."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last: dict[int, tuple[tuple[Any, ...], int, float]] = {}

    def lines(self, status: Mapping[str, Any]) -> list[str]:
        out = []
        now = self.clock()
        for p in status.get("ports") or []:
            port = int(p["port"])
            key = (p.get("step"), p.get("state"), p.get("wait_reason"))
            tenth = int(min(float(p.get("fraction") or 0.0), 1.0) / PROGRESS_STEP + 1e-9)
            last = self._last.get(port)
            if last is not None:
                last_key, last_tenth, last_s = last
                moved = tenth != last_tenth and now - last_s >= PROGRESS_INTERVAL_S
                if key == last_key and not moved:
                    continue
            self._last[port] = (key, tenth, now)
            out.append(view.progress_line(p))
        return out


async def follow(
    client: Client, out: Out, session_id: str, status: Mapping[str, Any], auto_confirm: bool
) -> int:
    """Follow a session until it ends: live on a terminal, lines otherwise, JSON lines
    with --json. Returns 0 if it completed, 4 otherwise."""
    interactive = not out.json and sys.stdin.isatty() and out.console.is_terminal
    sv = view.SessionView(status, auto_confirm=auto_confirm, interactive=interactive)
    with contextlib.suppress(CtlError):
        st = await client.call("status")
        scales = [
            c.get("time_scale") or 1.0 for c in st.get("controllers", []) if c.get("simulated")
        ]
        sv.time_scale = max(scales) if scales else None
    final = await _Follow(client, out, sv, auto_confirm=auto_confirm).run(
        session_id, status, interactive=interactive
    )
    if out.json:
        out.line({"session_id": session_id, "state": final})
    else:
        out.console.print(sv.render_final())
    return EXIT_OK if final == "completed" else EXIT_SESSION_FAILED


class _Follow:
    """One followed session: the view, the daemon's notifications, the operator's input
    and the calls it sends (each in its own task, so the view never waits for a reply)."""

    def __init__(
        self, client: Client, out: Out, sv: view.SessionView, *, auto_confirm: bool
    ) -> None:
        self.client = client
        self.out = out
        self.sv = sv
        self.auto_confirm = auto_confirm
        self.confirmed: set[tuple[int, int]] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.live: Live | None = None
        self.line_mode = not out.json and not out.console.is_terminal
        self.progress = ProgressLines()
        self.keys = KeyInput(sv, self.spawn, self.say)
        self.stopped_by: signal.Signals | None = None

    def say(self, text: str, style: str = "") -> None:
        self.sv.note(text, style)
        if self.out.json:
            self.out.line({"pbmctl": text})
        elif self.line_mode:
            self.out.console.print(text, style=style)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.sv.render(), refresh=True)

    async def send(self, method: str, params: dict[str, Any], done: str) -> None:
        try:
            await self.client.call(method, params)
            self.say(done)
        except CtlError as exc:
            self.say(f"{method} refused: {exc.message}", "bold red")
        self.refresh()

    def spawn(self, method: str, params: dict[str, Any], done: str) -> None:
        task = asyncio.create_task(self.send(method, params, done))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def check_waits(self) -> None:
        if not self.auto_confirm:
            return
        for port, step, site in view.placement_waits(self.sv.status):
            if (port, step) in self.confirmed:
                continue
            self.confirmed.add((port, step))
            self.spawn(
                "session.confirm",
                {"port": port},
                f"port {port}: placement at {site} confirmed automatically (--auto-confirm)",
            )

    def on_key(self) -> None:
        try:
            data = os.read(sys.stdin.fileno(), 64)
        except BlockingIOError:
            return
        self.keys.feed(data.decode(errors="replace"))
        self.refresh()

    async def run(self, session_id: str, status: Mapping[str, Any], *, interactive: bool) -> str:
        """Show the session until it ends; returns its final state."""
        if not interactive:
            return await self._run(session_id, status, interactive=False)
        with keys_mode(sys.stdin.fileno()), self._stop_signals():
            return await self._run(session_id, status, interactive=True)

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """Ctrl-C (SIGINT), SIGTERM and SIGHUP end the view through the finally blocks
        that put the terminal back, never by dying in cbreak mode. The view promises
        "Ctrl-C: leave this view", so it takes these signals even when pbmctl was
        started with them ignored or blocked (a launcher's inherited mask)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous_sigint = signal.getsignal(signal.SIGINT)
        blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, signals) & set(signals)

        def stop(sig: signal.Signals) -> None:
            self.stopped_by = sig
            task.cancel()

        for sig in signals:
            loop.add_signal_handler(sig, stop, sig)
        try:
            yield
        except asyncio.CancelledError:
            if self.stopped_by is None:
                raise
            task.uncancel()
            goes_on = (
                "the session goes on in pbmd (follow it with `pbmctl session watch`, stop "
                "it with `pbmctl session abort`)"
            )
            if self.stopped_by == signal.SIGINT:
                raise Interrupted(f"interrupted (Ctrl-C); {goes_on}") from None
            raise Interrupted(f"stopped by {self.stopped_by.name}; {goes_on}") from None
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            if previous_sigint is not None:
                signal.signal(signal.SIGINT, previous_sigint)
            if blocked:
                signal.pthread_sigmask(signal.SIG_BLOCK, blocked)

    async def _run(self, session_id: str, status: Mapping[str, Any], *, interactive: bool) -> str:
        out = self.out
        if self.auto_confirm:
            self.say(
                "--auto-confirm: pbmctl confirms every gated placement by itself, for this "
                "demonstration only; in a clinic the clinician confirms each placement",
                "bold yellow",
            )
        loop = asyncio.get_running_loop()
        reading_keys = False
        try:
            if interactive:
                loop.add_reader(sys.stdin.fileno(), self.on_key)
                reading_keys = True
            if not out.json and not self.line_mode:
                self.live = Live(
                    self.sv.render(), console=out.console, auto_refresh=False, transient=False
                )
                self.live.start()
            elif out.json:
                out.line({"session_id": session_id, "status": status})
            else:
                self._progress(status)
            self.check_waits()
            return await self._until_ended()
        finally:
            if reading_keys:
                loop.remove_reader(sys.stdin.fileno())
            if self.live is not None:
                self.live.update(self.sv.render(), refresh=True)
                self.live.stop()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def _progress(self, status: Mapping[str, Any]) -> None:
        for line in self.progress.lines(status):
            self.out.console.print(line, markup=False, highlight=False)

    async def _until_ended(self) -> str:
        out, sv = self.out, self.sv
        while True:
            msg = await self.client.notifications.get()
            if msg is None:
                raise DaemonUnreachable(
                    f"{self.client.closed_reason}; the session goes on in pbmd (emission is "
                    "governed there). Follow it again with `pbmctl session watch`"
                )
            method = msg.get("method")
            params = msg.get("params") or {}
            if out.json:
                out.line(msg)
            if method == "session.status":
                sv.status = params.get("status") or sv.status
                if self.line_mode:
                    self._progress(sv.status)
            elif method == "session.event":
                text = sv.add_event(params.get("event") or {})
                if self.line_mode and text is not None:
                    out.console.print(text)
            elif method == "session.ended":
                sv.status = params.get("status") or sv.status
                return str(params.get("state"))
            elif method == "daemon.stopping":
                self.say(f"pbmd: {params.get('message')}", "bold red")
            self.check_waits()
            self.refresh()
