"""Where pod kernels live: one module per backend, one interface.

A backend launches a pod kernel for a :class:`~kt_jupyter.compute.Compute`,
finds it again by name (from any process), reports its state and logs, and
deletes it. It never knows what a cell is: callers get a
:class:`KernelHandle` and open a :class:`~kt_jupyter.client.Session` on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload

from ..client import Session
from ..compute import Compute
from ..errors import BackendUnavailable, ComputeSpecError, KtError, NotFoundError
from ..names import BACKENDS

if TYPE_CHECKING:
    from .kubernetes import KubernetesBackend
    from .local import LocalBackend


def kt_home() -> Path:
    """The directory of kt state (``KT_HOME`` or ``~/.kt``)."""
    return Path(os.environ.get("KT_HOME") or Path.home() / ".kt")


@dataclass
class KernelHandle:
    """How to reach one running pod kernel, and how to tell whether it still lives."""

    name: str
    backend: str
    url: str
    token: str = field(repr=False)
    pid: int | None = None
    started: float = 0.0
    where: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    liveness: Callable[[], str | None] | None = field(default=None, repr=False, compare=False)
    #: host the pod's bulk channel is reachable at from here (None: WebSocket only)
    bulk_host: str | None = None
    close_hook: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    #: the pod's bulk port -> the address reaching it from here (a port-forward's), None: WebSocket only;
    #: without a resolver the bulk channel is at ``bulk_host`` and the pod's own port
    bulk_resolver: Callable[[int], tuple[str, int] | None] | None = field(default=None, repr=False, compare=False)
    #: why the way to the kernel (a port-forward) last failed, e.g. RBAC refusing it ("" when it did not)
    path_error: Callable[[], str] | None = field(default=None, repr=False, compare=False)

    def session(self, **kw: Any) -> Session:
        """A new client session to this kernel (not yet connected)."""
        kw.setdefault("bulk_host", self.bulk_host)
        kw.setdefault("bulk_resolver", self.bulk_resolver)
        kw.setdefault("path_error", self.path_error)
        return Session(self.url, self.token, name=self.name, liveness=self.liveness, **kw)


@dataclass
class KernelInfo:
    """What ``list``/``status`` report about a compute."""

    name: str
    backend: str
    phase: str  # launching | ready | running | stopped | failed
    where: str = ""
    pid: int | None = None
    started: float = 0.0
    spec: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


class Backend(Protocol):
    """The interface every backend implements."""

    name: str

    def launch(self, compute: Compute, *, keep: bool = False,
               on_event: Callable[[str], None] | None = None) -> KernelHandle:
        """Start a pod kernel for ``compute`` (or return the running one of that name)."""

    def find(self, name: str) -> KernelHandle | None:
        """The running kernel of that name, or None."""

    def list(self) -> list[KernelInfo]:
        """Every compute this backend knows of."""

    def status(self, name: str) -> KernelInfo:
        """One compute's state."""

    def logs(self, name: str, tail: int | None = 100) -> str:
        """The last ``tail`` lines of the kernel's log (all with None)."""

    def delete(self, name: str, grace_period_s: float = 5.0) -> bool:
        """Stop the kernel and remove everything of it; False if there was none."""

    def forward_port(self, name: str, remote_port: int) -> int:
        """A local port that reaches ``remote_port`` on the pod kernel's loopback (the debugger's).

        Local: the same port (same host). Kubernetes: a port-forward to the pod.
        """


#: Compute parameters that shape a running kernel: asking for another value of one asks for another kernel.
SPEC_KEYS = ("cpus", "memory", "disk_size", "gpus", "gpu_type", "gpu_memory", "shared_memory_limit", "image",
             "env_vars", "secrets", "volumes", "working_dir", "node_selector", "tolerations", "queue",
             "priority_class_name", "service_account_name", "inactivity_ttl", "freeze", "replicas",
             "allowed_serialization", "image_pull_policy", "gpu_anti_affinity", "namespace")


def spec_mismatch(requested: Compute, running: dict[str, Any], keys: tuple[str, ...] = SPEC_KEYS) -> str:
    """'' when the running kernel's spec (``to_dict`` form) has what ``requested`` asks for, else what differs.

    Only what ``requested`` sets (a value other than ``Compute()``'s) counts:
    a request that leaves memory unset takes the running kernel's memory.
    The answer reads like ``memory='512Mi' (not '1Gi'), gpus=None (not '1')``.
    """
    asked, default = requested.to_dict(), Compute().to_dict()
    return ", ".join(f"{key}={running.get(key)!r} (not {asked[key]!r})" for key in keys
                     if key in asked and asked[key] != default.get(key) and key in running
                     and running[key] != asked[key])


def spec_mismatch_error(name: str, mismatch: str) -> KtError:
    """The error for a request a running kernel of that name does not match."""
    return ComputeSpecError(f"compute {name!r} is already running with {mismatch}; `%kt down {name}` then run "
                            "this cell again (its variables are lost), or pick another --name")


_instances: dict[str, Any] = {}


@overload
def get_backend(name: Literal["local"]) -> LocalBackend: ...
@overload
def get_backend(name: Literal["kubernetes"]) -> KubernetesBackend: ...
@overload
def get_backend(name: str) -> Backend: ...


def get_backend(name: str) -> Backend:
    """The backend object for ``name`` (``local`` or ``kubernetes``)."""
    if name not in BACKENDS:
        raise ComputeSpecError(f"unknown backend {name!r}; use one of: {', '.join(BACKENDS)}")
    if name not in _instances:
        if name == "local":
            from .local import LocalBackend

            _instances[name] = LocalBackend()
        else:
            try:
                from .kubernetes import KubernetesBackend
            except ImportError:
                raise BackendUnavailable(
                    "the kubernetes backend is not part of this build yet; use --backend local"
                ) from None
            _instances[name] = KubernetesBackend()
    return _instances[name]


def backend_with(name: str, preferred: str) -> str:
    """The backend that has a compute named ``name``: ``preferred`` when it does, else the first other that does.

    So ``%kt down NAME`` and ``%kt status NAME`` find a Kubernetes compute
    whatever the default backend is. A backend that cannot be asked (no
    cluster configured) is skipped; with no backend knowing the name, ``preferred``.
    """
    for backend in [preferred] + [b for b in BACKENDS if b != preferred]:
        try:
            get_backend(backend).status(name)
        except NotFoundError:
            continue
        except KtError:  # unavailable, unreachable, forbidden: it cannot be the one
            continue
        return backend
    return preferred
