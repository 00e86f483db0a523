"""Memory limits for local pod kernels, enforced with RLIMIT_DATA.

On Kubernetes a container that passes its memory limit is killed (OOMKilled).
A local subprocess has no cgroup of its own, so the local backend limits the
kernel process's private writable memory (heap, anonymous mmaps, thread
stacks) instead: an allocation past the limit fails with ``MemoryError`` in
the cell, and the kernel and its variables survive. The limit is per process
(a subprocess the cell starts gets its own copy of it) and counts memory
reserved (``np.empty``) as well as memory touched, so it is a little stricter
than a container limit on resident memory.
"""

from __future__ import annotations

import resource


def apply_memory_limit(pid: int, limit_bytes: int) -> None:
    """Cap process ``pid``'s private writable memory at ``limit_bytes`` (soft and hard)."""
    resource.prlimit(pid, resource.RLIMIT_DATA, (limit_bytes, limit_bytes))


def memory_limit(pid: int) -> int | None:
    """The RLIMIT_DATA of process ``pid`` in bytes, or None when unlimited."""
    soft, _hard = resource.prlimit(pid, resource.RLIMIT_DATA)
    return None if soft == resource.RLIM_INFINITY else soft
