"""How a remote cell's output shows up in the notebook: streams, displays, results, progress."""

from __future__ import annotations

import re
import sys
import time
from html import escape
from typing import Any, Protocol

from .errors import CellSyntaxError
from .quantities import RATE_MIN_S, format_bytes

#: Transfers smaller than this show no progress line.
PROGRESS_MIN_BYTES = 8 << 20


class RemoteResult:
    """The value of a remote cell's last expression, shown as the cell's Out[] like a local one."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.data = data
        self.metadata = metadata or {}

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.data, self.metadata

    def __repr__(self) -> str:
        return self.data.get("text/plain", "<remote result>")


def show_output(msg: dict[str, Any]) -> None:
    """Render one output message of a remote cell in the current cell (call from its thread)."""
    kind = msg["type"]
    if kind == "stream":
        stream = sys.stderr if msg.get("name") == "stderr" else sys.stdout
        stream.write(msg["text"])
        stream.flush()
    elif kind == "display":
        from IPython.display import publish_display_data

        kwargs: dict[str, Any] = {}
        if msg.get("transient"):
            kwargs["transient"] = msg["transient"]
        if msg.get("update"):
            kwargs["update"] = True
        publish_display_data(msg.get("data", {}), msg.get("metadata") or None, **kwargs)
    elif kind == "clear_output":
        from IPython.display import clear_output

        clear_output(wait=bool(msg.get("wait")))
    elif kind == "notice":
        show_notice(str(msg.get("text", "")), str(msg.get("level") or "warning"))
    elif kind == "error":  # not the cell's own error: a callback's after it (a matplotlib draw), shown as locally
        show_error_output(msg)


def show_error_output(msg: dict[str, Any]) -> None:
    """An error output of the cell, as IPython shows one: ipykernel's ``error`` message, a terminal's text."""
    from IPython.core.getipython import get_ipython

    shell = get_ipython()
    lines = "\n".join(str(line) for line in msg.get("traceback") or []).split("\n")
    theme = str(getattr(shell, "colors", "nocolor") or "nocolor")
    stb = ["\n".join(colour_traceback(drop_internal_frames(lines), theme))]
    if shell is None:
        print(stb[0], file=sys.stderr)
        return
    etype = type(str(msg.get("ename") or "Exception"), (Exception,), {})
    shell._showtraceback(etype, str(msg.get("evalue", "")), stb)


#: How a muted "[kt] ..." line looks in a notebook (JupyterLab's secondary text colour, code font).
MUTED_STYLE = ("color: var(--jp-ui-font-color2, #757575); font-family: var(--jp-code-font-family, monospace); "
               "font-size: var(--jp-code-font-size, 13px); line-height: 1.4; margin: 0; white-space: pre-wrap")
_WARNING_WORDS = ("lost", "fail", "error", "cannot", "can't", "refus", "already running with", "not ", "killed",
                  "exited", "died", "gone", "warning")


def notice_level(text: str) -> str:
    """'warning' for a notice a user must act on or should not miss (state lost, a setting ignored),
    else 'info' (progress, good news: a launch step, 'reattached ... its variables are still there')."""
    low = text.lower()
    if "still there" in low:
        return "info"
    return "warning" if any(word in low for word in _WARNING_WORDS) else "info"


def in_notebook() -> bool:
    """Whether output goes to a notebook frontend (an IPython kernel), not a terminal."""
    try:
        from IPython.core.getipython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def show_notice(text: str, level: str | None = None) -> None:
    """One ``[kt] ...`` line. Info (progress, good news) is a muted line in a notebook, never red stderr;
    a warning goes to stderr; a terminal gets stderr either way."""
    text = text.rstrip("\n")
    line = text if text.startswith("[kt]") else f"[kt] {text}"
    level = level or notice_level(text)
    if level != "info" or not in_notebook():
        print(line, file=sys.stderr, flush=True)
        return
    from IPython.display import publish_display_data

    publish_display_data({"text/plain": line,
                          "text/html": f'<pre class="kt-notice" style="{MUTED_STYLE}">{escape(line)}</pre>'})


class ProgressReporter(Protocol):
    """``on_progress(direction, done, total)`` of transfers, which can end the ones that will not finish."""

    def __call__(self, direction: str, done: int, total: int) -> None: ...

    def stop(self, why: str) -> None: ...


def stopped_because(exc: BaseException) -> str:
    """Why a transfer stopped, in a word or two, for its progress line."""
    return "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed ({type(exc).__name__})"


class TransferProgress:
    """A one-line progress report (bytes, rate, ETA) for transfers over a few MB.

    In a notebook it is a muted line updated in place; elsewhere a ``\\r`` line on ``stream`` (stderr).
    """

    def __init__(self, stream=None, min_bytes: int = PROGRESS_MIN_BYTES) -> None:
        self.stream = stream
        self.min_bytes = min_bytes
        self._start: dict[str, tuple[float, int]] = {}
        self._display_ids: dict[str, str] = {}
        self._last_draw = 0.0

    def __call__(self, direction: str, done: int, total: int) -> None:
        if total < self.min_bytes:
            return
        now = time.perf_counter()
        # from its first report, with bytes moved already: the rate counts only what moves from then on
        start, start_done = self._start.setdefault(direction, (now, done))
        finished = done >= total
        if not finished and now - self._last_draw < 0.2:
            return
        self._last_draw = now
        elapsed = now - start
        line = f"[kt] {direction} {format_bytes(done)} / {format_bytes(total)}"
        if done > start_done and elapsed >= RATE_MIN_S:
            rate = (done - start_done) / elapsed
            line += f"  {format_bytes(rate)}/s" + ("" if finished else f"  ETA {(total - done) / rate:.0f} s")
        self._show(direction, line, last=finished)

    def stop(self, why: str) -> None:
        """Transfers that will not finish (a Ctrl-C, a failure) end their line saying so: a stale ETA stays
        otherwise, and on a terminal the error went on the same line."""
        for direction in list(self._start):
            self._show(direction, f"[kt] {direction} stopped: {why}", last=True)

    def _show(self, direction: str, line: str, last: bool) -> None:
        """Draw ``line`` for ``direction`` (in place); ``last``: the transfer's line ends there."""
        if self.stream is None and in_notebook():
            self._draw_in_notebook(direction, line)
        else:
            stream = self.stream or sys.stderr
            stream.write("\r" + line + ("\n" if last else ""))
            stream.flush()
        if last:
            self._start.pop(direction, None)
            self._display_ids.pop(direction, None)

    def _draw_in_notebook(self, direction: str, line: str) -> None:
        from IPython.display import publish_display_data

        data = {"text/plain": line, "text/html": f'<pre class="kt-notice" style="{MUTED_STYLE}">{escape(line)}</pre>'}
        display_id = self._display_ids.get(direction)
        if display_id is None:
            display_id = self._display_ids[direction] = f"kt-transfer-{id(self)}-{direction}"
            publish_display_data(data, transient={"display_id": display_id})
        else:
            publish_display_data(data, transient={"display_id": display_id}, update=True)


# ---------------------------------------------------------------------- tracebacks

#: Frames of these packages are ours (the pod's executor, the client): a user never needs them.
INTERNAL_PATH_RE = re.compile(r"[/\\](pod_kernel|kt_jupyter)[/\\][\w/\\]*\.py")
_TOPLINE_RE = re.compile(r"^-{20,}$")
_HEAD_RE = re.compile(r"^(\S+)(\s+)(Traceback \(most recent call last\))$")
_FRAME_RE = re.compile(
    r"^(\s*)(Cell In\[[^\]]*\]|File [^\n]+?:\d+|File [^,\n]+)(, line \d+)?(?:(, in )(\w[\w.<>]*)(\(.*\))?)?$")
_CODE_RE = re.compile(r"^(\s*-*> ?|\s+)(\d+)( .*)?$")
_EXC_RE = re.compile(r"^([A-Za-z_][\w.]*)(:.*)?$")


def drop_internal_frames(lines: list[str]) -> list[str]:
    """A remote traceback (IPython's Context format, one string per line) without frames of our own code."""
    out: list[str] = []
    skipping = False
    for line in lines:
        frame = _FRAME_RE.match(line)
        if frame:
            skipping = bool(INTERNAL_PATH_RE.search(frame.group(2)))
        elif _EXC_RE.match(line) and not line[:1].isspace():
            skipping = False  # the exception line (or a chained traceback) ends a frame
        if not skipping:
            out.append(line)
    while len(out) > 1 and out[-1] == "" and out[-2] == "":
        out.pop()
    return out


def colour_traceback(lines: list[str], theme_name: str) -> list[str]:
    """A plain IPython traceback coloured as IPython colours a local one in ``theme_name`` (``nocolor``: as is)."""
    from IPython.utils.PyColorize import Parser, theme_table
    from pygments.token import Token

    theme = theme_table.get((theme_name or "nocolor").lower())
    if theme is None or theme.name == "nocolor":
        return list(lines)
    code = Parser(theme_name=theme.name)

    def paint(*parts: tuple[Any, str]) -> str:  # plain text (token None) stays uncoloured, as IPython leaves it
        return "".join(text if token is None else theme.format([(token, text)]) for token, text in parts if text)

    out = []
    for i, line in enumerate(lines):
        if _TOPLINE_RE.match(line):
            out.append(paint((Token.Topline, line)))
        elif m := _HEAD_RE.match(line):
            out.append(paint((Token.ExcName, m[1]), (None, m[2] + m[3])))
        elif m := _FRAME_RE.match(line):
            out.append(paint((None, m[1]), (Token.FilenameEm, m[2] + (m[3] or "")), (None, m[4] or ""),
                             (Token.VName, m[5] or ""), (Token.ValEm, m[6] or "")))
        elif m := _CODE_RE.match(line):
            token = Token.LinenoEm if ">" in m[1] else Token.Lineno
            text = (m[3] or "")[1:]
            body = (code.format(text, "str") or text).rstrip("\n") if text.strip() else text
            out.append(paint((token, m[1] + m[2])) + (" " + body if m[3] else ""))
        elif (m := _EXC_RE.match(line)) and i >= len(lines) - 3:
            out.append(paint((Token.ExcName, m[1]), (None, m[2] or "")))
        else:
            out.append(line)
    return out


def present_error(exc: BaseException, shell: Any, execution_count: int | None = None) -> BaseException:
    """What to raise for a ``%%kt`` cell's error so that IPython shows it as it shows a local cell's:
    coloured in the shell's theme, without frames of kt_jupyter or the pod kernel."""
    theme = str(getattr(shell, "colors", "nocolor") or "nocolor")
    if isinstance(exc, SyntaxError) and not hasattr(exc, "remote_traceback"):
        return _cell_syntax_error(exc, shell, execution_count)
    render = getattr(exc, "_render_traceback_", None)
    if hasattr(exc, "remote_traceback") and render is not None:
        try:
            lines = "\n".join(render()).split("\n")
        except Exception:
            return exc
        _set_render(exc, ["\n".join(colour_traceback(drop_internal_frames(lines), theme))])
    return exc


def _cell_syntax_error(exc: SyntaxError, shell: Any, execution_count: int | None) -> BaseException:
    """The cell did not parse here (nothing was sent): IPython's own SyntaxError display, 'Cell In[N], line L'."""
    syntax_tb = getattr(shell, "SyntaxTB", None)
    if syntax_tb is None:
        return exc
    if execution_count is not None and exc.filename == "<cell>":
        name = f"<kt-cell-{execution_count}>"
        filename_map = getattr(getattr(shell, "compile", None), "_filename_map", None)
        if isinstance(filename_map, dict):  # IPython's compiler turns this name into "Cell In[N]"
            filename_map[name] = execution_count
        exc.filename = name
    try:
        stb = syntax_tb.structured_traceback(type(exc), exc, [])
    except Exception:  # an IPython without this formatter: its default display stays
        return exc
    return CellSyntaxError(exc, list(stb))


def _set_render(exc: BaseException, lines: list[str]) -> None:
    try:
        exc._render_traceback_ = lambda: lines  # type: ignore[attr-defined]
    except AttributeError:  # an exception type without __dict__: IPython's default display stays
        pass
