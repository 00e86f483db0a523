"""The pod kernel container's start: the ``/bin/sh -c`` script, and what it takes from the notebook.

The script works for any user id and any Python image: everything it writes
goes to the ``kt-cache`` emptyDir (:data:`CACHE_DIR`): the pod kernel's
dependencies (``site``), pip's cache, a ``HOME`` when the image gives none
that is writable, and the user site where setup steps' ``pip_install`` puts
packages (PEP 668 images included). The dependencies are pinned to the
notebook's own versions (:func:`pinned_deps`: cloudpickle above all, since
values pickled by one version are only sure to load in the same one); the
notebook's package index and proxy settings (:data:`INSTALL_ENV_VARS`) reach
the pod through the compute's Secret.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .compute import POD_KERNEL_PORT

if TYPE_CHECKING:
    from .compute import Compute

#: Where the ConfigMap's source is mounted (first on PYTHONPATH).
SRC_DIR = "/opt/kt/src"
#: An emptyDir that survives container restarts: dependencies, pip's cache, HOME and the user site.
CACHE_DIR = "/opt/kt/cache"
#: What the pod kernel needs besides the standard library, at the oldest versions it works with.
POD_KERNEL_DEPS = ("websockets>=14", "cloudpickle>=3.0", "ipython>=9.0", "psutil>=5.9")
#: The notebook's settings for reaching a package index, passed on to the pod (through its Secret).
INSTALL_ENV_VARS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "HTTP_PROXY", "HTTPS_PROXY",
                    "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
#: The address the pod kernel binds in a pod.
KERNEL_HOST = "::"

_VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+!-]*$")
_PIP = '"$KT_PY" -m pip install --disable-pip-version-check --no-input'


def _notebook_version(dist: str) -> str | None:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    return version if _VERSION_RE.match(version) else None


def pinned_deps() -> tuple[str, ...]:
    """:data:`POD_KERNEL_DEPS` pinned to the versions installed here (``==``), where installed."""
    out = []
    for dep in POD_KERNEL_DEPS:
        name = re.split(r"[<>=!~]", dep, maxsplit=1)[0]
        version = _notebook_version(name)
        out.append(f"{name}=={version}" if version else dep)
    return tuple(out)


def notebook_install_env(compute: Compute, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The notebook's :data:`INSTALL_ENV_VARS` that are set and that the compute's own env does not set."""
    env = os.environ if environ is None else environ
    own = {**compute.image.env_vars, **compute.env_vars}
    return {k: env[k] for k in INSTALL_ENV_VARS if env.get(k) and k not in own}


def split_env(compute: Compute) -> tuple[dict[str, str], dict[str, str]]:
    """(plain env for the container spec, env with ``$`` references the shell must expand)."""
    env = {**compute.image.env_vars, **compute.env_vars}
    expand = {k: v for k, v in env.items() if "$" in v}
    return {k: v for k, v in sorted(env.items()) if k not in expand}, dict(sorted(expand.items()))


def _shell_expandable(value: str) -> str:
    """Double-quoted so ``$VAR`` expands, but no command substitution runs."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace("$(", "\\$(")
    return f'"{escaped}"'


def _writable_dirs() -> list[str]:
    return [
        "# any uid: HOME, caches and pip's user site in the emptyDir (restricted pods run as a uid with no home)",
        '{ [ -n "${HOME:-}" ] && [ "$HOME" != / ] && [ -w "$HOME" ]; } || export HOME="$KT_CACHE_DIR/home"',
        'export PYTHONUSERBASE="${PYTHONUSERBASE:-$KT_CACHE_DIR/user}"',
        'export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$HOME/.cache}"',
        'export USER="${USER:-kt}" LOGNAME="${LOGNAME:-kt}" PIP_BREAK_SYSTEM_PACKAGES=1',
        'mkdir -p "$HOME" "$PYTHONUSERBASE"',
        "# a proxy must not see in-cluster traffic (the API server, Services)",
        'if [ -n "${HTTPS_PROXY:-}${https_proxy:-}${HTTP_PROXY:-}${http_proxy:-}" ]; then',
        '  KT_NO_PROXY="${NO_PROXY:-${no_proxy:-}}"',
        ('  export NO_PROXY="${KT_NO_PROXY:+$KT_NO_PROXY,}localhost,127.0.0.1,::1,.svc,.cluster.local'
        '${KUBERNETES_SERVICE_HOST:+,$KUBERNETES_SERVICE_HOST}"'),
        '  export no_proxy="$NO_PROXY"',
        "fi",
    ]


def _deps_lines(compute: Compute) -> list[str]:
    pins = pinned_deps()
    cloudpickle = next(p for p in pins if p.startswith("cloudpickle"))
    want = cloudpickle.partition("==")[2]
    check_py = ("import sys, websockets, cloudpickle, IPython, psutil; "
                'sys.exit(int(websockets.__version__.split(".")[0]) < 14'
                + (f' or cloudpickle.__version__ != "{want}")' if want else ")"))
    check = f'"$KT_PY" -c {shlex.quote(check_py)} 2>/dev/null'
    if compute.freeze:
        lines = [(f'"$KT_PY" -c {shlex.quote("import websockets, cloudpickle, IPython, psutil")} 2>/dev/null || '
                 f'{{ echo "[kt] freeze=True but the image lacks the pod kernel dependencies '
                 f'({", ".join(POD_KERNEL_DEPS)}); bake them in or drop freeze" >&2; exit 1; }}')]
        if want:
            same = f'import sys, cloudpickle; sys.exit(cloudpickle.__version__ != "{want}")'
            lines.append(f'"$KT_PY" -c {shlex.quote(same)} 2>/dev/null || '
                         f'echo "[kt] warning: the image\'s cloudpickle is not {want}, the notebook\'s; '
                         'values may not load on the other side: rebuild the image with cloudpickle=='
                         f'{want}" >&2')
        return lines
    target = f'{_PIP} --quiet --upgrade --target "$KT_CACHE_DIR/site"'
    floors = " ".join(shlex.quote(d) for d in (cloudpickle,) + tuple(d for d in POD_KERNEL_DEPS
                                                                       if not d.startswith("cloudpickle")))
    return [
        f"if ! {check}; then",
        ('  echo "[kt] installing pod kernel dependencies at the notebook\'s versions (cached for container '
        'restarts)" >&2'),
        f"  {target} {' '.join(shlex.quote(p) for p in pins)} || {{",
        '    echo "[kt] the notebook\'s exact versions did not install; trying the oldest that work" >&2',
        f"    {target} {floors}",
        "  } || {",
        ('    echo "[kt] cannot install the pod kernel dependencies: give the notebook PIP_INDEX_URL or HTTPS_PROXY '
        'for a package index the pod can reach, or use an image that has them (KT_POD_IMAGE, '
        'pod_kernel/Dockerfile)" >&2'),
        "    exit 1",
        "  }",
        "fi",
    ]


def _setup_lines(compute: Compute) -> list[str]:
    image = compute.image
    if not image.steps:
        return []
    lines = [
        "# image setup steps: once per container (the marker is on the container's own filesystem)",
        f'KT_SETUP_MARKER="${{KT_MARKER_DIR:-${{TMPDIR:-/tmp}}}}/.kt-setup-{image.setup_hash}"',
        ('if [ -f "$KT_SETUP_MARKER" ]; then KT_SETUP_DONE=1; else KT_SETUP_DONE=0; '
        f'echo "[kt] running {len(image.steps)} image setup step(s)" >&2; fi'),
    ]
    if image.install_cmd:
        install = image.install_cmd
    elif any(s.kind == "pip_install" for s in image.steps):
        install = "kt_pip_install"
        lines += [
            "# pip_install: into the image's venv if writable, else the user site (PEP 668 images too),",
            "# else (a read-only venv) next to the pod kernel's dependencies",
            "kt_pip_install() {",
            "  if ! \"$KT_PY\" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then",
            f'    {_PIP} --user "$@"',
            "  elif [ -w \"$(\"$KT_PY\" -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')\" ]; then",
            f'    {_PIP} "$@"',
            "  else",
            f'    {_PIP} --target "$KT_CACHE_DIR/site" "$@"',
            "  fi",
            "}",
        ]
    else:
        install = ""
    if any(s.kind == "run_bash" for s in image.steps):
        lines.append('KT_SH="$(command -v bash || echo sh)"')
    for step in image.steps:
        if step.kind == "pip_install":
            reqs, force = step.args
            cmd = f"{install} {' '.join(shlex.quote(r) for r in reqs)}"
        elif step.kind == "run_bash":
            command, force = step.args
            cmd = f'"$KT_SH" -c {shlex.quote(command)}'
        else:  # set_env_vars: in the container's env already
            continue
        lines.append(cmd if force else f'[ "$KT_SETUP_DONE" = 1 ] || {cmd}')
    lines.append('touch "$KT_SETUP_MARKER"')
    return lines


def startup_script(compute: Compute) -> str:
    """The container's ``/bin/sh -c`` script: writable dirs, dependencies, image setup, ``exec python -m pod_kernel``.

    Idempotent: dependencies go to an emptyDir that outlives container
    restarts and are skipped when importable at the pinned cloudpickle;
    setup steps run once per container, keyed by
    :attr:`~kt_jupyter.image.Image.setup_hash`. With ``freeze=True`` nothing is
    installed: the image must hold the pod kernel. ``KT_SRC_DIR``,
    ``KT_CACHE_DIR``, ``KT_MARKER_DIR`` and ``KT_PORT`` in the environment
    override where it looks, writes and listens (for a test that runs it
    outside a pod).
    """
    py = shlex.quote(compute.image.python_path) if compute.image.python_path else \
        '"$(command -v python || command -v python3 || true)"'
    lines = [
        "set -e",  # not -u: user env values may name unset variables ("$LD_LIBRARY_PATH:/x")
        f"KT_PY={py}",
        '[ -n "$KT_PY" ] || { echo "[kt] no python or python3 in the image; use a Python image" >&2; exit 1; }',
        f'KT_SRC_DIR="${{KT_SRC_DIR:-{SRC_DIR}}}"',
        f'KT_CACHE_DIR="${{KT_CACHE_DIR:-{CACHE_DIR}}}"',
        'export PYTHONPATH="$KT_SRC_DIR:$KT_CACHE_DIR/site${PYTHONPATH:+:$PYTHONPATH}"',
        'export PIP_CACHE_DIR="$KT_CACHE_DIR/pip"',
    ]
    lines += _writable_dirs()
    _, expand = split_env(compute)
    lines += [f"export {k}={_shell_expandable(v)}" for k, v in expand.items()]
    lines += _deps_lines(compute)
    lines += _setup_lines(compute)
    argv = ["--compute-name", compute.name, "--allowed-serialization", ",".join(compute.allowed_serialization),
            "--log-level", compute.logging_config.level.upper()]
    kernel = (f'"$KT_PY" -m pod_kernel --host {KERNEL_HOST} --port "${{KT_PORT:-{POD_KERNEL_PORT}}}" '
              + " ".join(shlex.quote(a) for a in argv))
    if compute.inactivity_ttl_s:  # on Kubernetes the compute is then a Job, which its kernel's exit 0 completes
        kernel += f" --inactivity-ttl {compute.inactivity_ttl_s:g}"
    lines.append(f"exec {kernel}")
    return "\n".join(lines) + "\n"
