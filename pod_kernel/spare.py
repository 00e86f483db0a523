"""``python -m pod_kernel.spare``: a pod kernel process started before anyone asked for it.

The local backend keeps one ready (:mod:`kt_jupyter.backends.local_spare`):
Python has started and the pod kernel's modules (IPython, websockets,
cloudpickle) are imported, which is most of a cold start. A launch writes one
JSON object to its stdin: the environment, working directory, log file and
``python -m pod_kernel`` arguments the kernel would have been started with;
the process takes them on and serves as that kernel. Only settings Python
reads at startup (``PYTHON*``, ``LD_*``) cannot be taken on: the backend
starts a fresh process when those differ. End of input without a launch (the
notebook exited or let the spare go) ends the process.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    """Import ahead, wait for a launch on stdin, then serve as that kernel."""
    import IPython.core.interactiveshell  # noqa: F401 - the slow imports, done before anyone waits
    import websockets.asyncio.server  # noqa: F401

    from . import __main__ as entry
    from . import executor, server  # noqa: F401

    raw = sys.stdin.buffer.read()
    if not raw:
        os._exit(0)
    launch = json.loads(raw)
    started_in = os.getcwd()
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in launch["env"].items()})
    os.chdir(launch["cwd"])
    if sys.path and sys.path[0] in ("", started_in):  # as `python -m pod_kernel` started there would have it
        sys.path[0] = os.getcwd()
    log = os.open(launch["log"], os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.argv = ["pod_kernel", *launch["argv"]]
    entry.main(list(launch["argv"]))


if __name__ == "__main__":
    main()
