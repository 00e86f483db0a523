"""Every exception kt_jupyter raises, in one place.

Each carries a message that says what happened and what to do; none of them
ever carries a token.
"""

from __future__ import annotations


class KtError(Exception):
    """Base class of all kt_jupyter errors."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a stack trace through kt_jupyter's own code
        return [f"{type(self).__name__}: {self}"]


class ComputeSpecError(KtError, ValueError):
    """A Compute parameter or magic option is invalid (bad quantity, unknown key, ...)."""


class BackendUnavailable(KtError):
    """A backend cannot be used here (not configured, or not available in this build)."""


class LaunchError(KtError):
    """A compute could not be started or did not become ready in time."""


class ImagePullError(LaunchError):
    """Kubernetes cannot pull the compute's container image (ErrImagePull / ImagePullBackOff)."""


class UnschedulableError(LaunchError):
    """No node can take the pod (too little of a resource, no matching node, taints, quota)."""


class CrashLoopError(LaunchError):
    """The pod kernel's container keeps exiting while starting (CrashLoopBackOff, bad config)."""


class OOMKilledError(LaunchError):
    """The pod kernel's container was killed for exceeding its memory limit while starting."""


class LaunchTimeoutError(LaunchError, TimeoutError):
    """The compute was not ready within its launch_timeout."""


class KubernetesAPIError(KtError):
    """The Kubernetes API refused or failed a request (forbidden, invalid, server error)."""


class KernelDiedError(KtError):
    """The pod kernel process exited or was killed; remote state is lost."""


class ConnectionLostError(KtError):
    """The connection to a pod kernel dropped and could not be resumed."""


class AuthError(KtError):
    """The pod kernel rejected our token."""


class ProtocolMismatchError(KtError):
    """The pod kernel speaks another protocol version."""


class TransferError(KtError):
    """A value could not be serialised, sent or received."""


class RemoteTimeoutError(KtError, TimeoutError):
    """A remote operation did not finish within its timeout."""


class NotFoundError(KtError, LookupError):
    """No compute (or remote name) by that name exists."""


class RemoteError(KtError):
    """An exception raised by remote code whose type cannot be imported locally.

    ``ename`` is the remote type's qualified name, ``evalue`` its message and
    ``remote_traceback`` the remote traceback text.
    """

    def __init__(self, ename: str, evalue: str, remote_traceback: str = "") -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return (type(self), (self.ename, self.evalue, self.remote_traceback))


class OutOfMemoryError(KtError, MemoryError):
    """A cell ran out of memory on its pod kernel; the message names the compute's memory limit.

    ``memory`` is the limit the cell ran under (None when none was set) and
    ``tried`` every limit tried, when ``--retry-oom`` retried with more.
    """

    def __init__(self, message: str, memory: str | None = None, tried: tuple[str | None, ...] = ()) -> None:
        super().__init__(message)
        self.memory = memory
        self.tried = tried


class CellSyntaxError(KtError):
    """A ``%%kt`` cell that does not parse, shown exactly as IPython shows a local cell's SyntaxError.

    Not a SyntaxError subclass: IPython (and ipykernel) print any SyntaxError
    raised inside a magic with the whole stack through the magic. It carries the
    name ``SyntaxError``, so the notebook's error output (``ename``) is what a
    local cell's is; the original is ``.error``.
    """

    def __init__(self, error: SyntaxError, stb: list[str]) -> None:
        super().__init__(f"{error.msg} (line {error.lineno})")
        self.error = error
        self._stb = stb

    def _render_traceback_(self) -> list[str]:
        """The lines IPython shows for it: those of a local SyntaxError."""
        return self._stb


CellSyntaxError.__name__ = CellSyntaxError.__qualname__ = "SyntaxError"


def interrupted(text: str) -> KeyboardInterrupt:
    """A KeyboardInterrupt that says what the Ctrl-C left where, shown by IPython as that one line (no frames
    of ours: they say nothing to the user)."""
    exc = KeyboardInterrupt(text)
    exc._render_traceback_ = lambda: [f"KeyboardInterrupt: {text}"]  # type: ignore[attr-defined]
    return exc
