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
