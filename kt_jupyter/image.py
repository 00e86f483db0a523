"""The container image of a compute: a base image plus setup steps, recorded as data.

``Image(image_id="python:3.11-slim").pip_install(["torch"]).run_bash("apt-get ...")``
builds a description, nothing more: the steps run in the pod at start (see
:func:`kt_jupyter.manifests.startup_script`), once per container, keyed by
:attr:`Image.setup_hash`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ComputeSpecError

#: The base image when none is named and ``KT_POD_IMAGE`` is unset: the notebook's own Python
#: minor version, so that functions and classes pickled by value load on the other side.
DEFAULT_IMAGE_ID = f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
#: The setting that makes an image (typically a prebuilt pod-kernel image, see pod_kernel/Dockerfile) the default.
POD_IMAGE_ENV = "KT_POD_IMAGE"

#: Kinds of setup step, in the order they may appear.
STEP_KINDS = ("pip_install", "run_bash", "set_env_vars")

# [registry/]path[:tag][@digest]; a registry has a '.', a ':port' or is localhost; the path is lowercase
_REGISTRY = r"(?:(?:localhost|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+)(?::[0-9]+)?/|[a-zA-Z0-9-]+:[0-9]+/)"
_COMPONENT = r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*"
_IMAGE_RE = re.compile(
    rf"^{_REGISTRY}?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@[a-z0-9]+:[a-f0-9]{32,})?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def check_image_id(image_id: object, param: str = "image") -> str:
    """A container image reference, or a ComputeSpecError naming ``param``."""
    example = "python:3.11-slim"
    if not isinstance(image_id, str) or not image_id.strip():
        raise ComputeSpecError(f"{param} must be an image name like {example!r}; got {image_id!r}")
    text = image_id.strip()
    if not _IMAGE_RE.match(text) or len(text) > 512:
        raise ComputeSpecError(
            f"{param}: {image_id!r} is not a valid image reference (lowercase repository, optional "
            f"registry, :tag or @sha256:digest), e.g. {example!r} or 'ghcr.io/org/pod:1.0'")
    return text


def default_image_id(environ: Mapping[str, str] | None = None) -> str:
    """``KT_POD_IMAGE`` if set (validated), else :data:`DEFAULT_IMAGE_ID`."""
    env = os.environ if environ is None else environ
    value = env.get(POD_IMAGE_ENV, "").strip()
    return check_image_id(value, f"{POD_IMAGE_ENV} (environment variable)") if value else DEFAULT_IMAGE_ID


def check_env_vars(env: object, param: str = "env_vars") -> dict[str, str]:
    """A mapping of environment variable names to string values (scalars are turned into strings)."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise ComputeSpecError(f"{param} must be a dict like {{'OMP_NUM_THREADS': '4'}}; got {env!r}")
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME_RE.match(key):
            raise ComputeSpecError(
                f"{param}: {key!r} is not a valid environment variable name (letters, digits, '_', '.', '-'; "
                "not starting with a digit), e.g. 'OMP_NUM_THREADS'")
        if isinstance(value, bool):
            value = "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise ComputeSpecError(f"{param}[{key!r}] must be a string; got {value!r}")
        out[key] = str(value)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class SetupStep:
    """One image setup step: ``kind`` is one of :data:`STEP_KINDS`; ``args`` JSON-safe data."""

    kind: str
    args: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{"kind": ..., "args": [...]}`` (tuples become lists)."""
        return {"kind": self.kind, "args": _jsonable(self.args)}


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


class Image:
    """A container image: base ``image_id`` plus setup steps run once per container.

    Builder methods append a step and return ``self``, as in the seed::

        Image(image_id="python:3.11-slim").pip_install(["numpy"]).set_env_vars({"A": "1"})
    """

    def __init__(self, name: str | None = None, image_id: str | None = None,
                 python_path: str | None = None, install_cmd: str | None = None) -> None:
        """``image_id`` defaults to :func:`default_image_id`; ``python_path`` is the
        interpreter inside it (default ``python``); ``install_cmd`` replaces
        ``python -m pip install`` for :meth:`pip_install` steps."""
        self.name = name if name is None else str(name)
        self.image_id = check_image_id(image_id) if image_id is not None else default_image_id()
        if python_path is not None and (not isinstance(python_path, str) or not python_path.strip()):
            raise ComputeSpecError(f"image python_path must be a path like '/usr/bin/python3'; got {python_path!r}")
        self.python_path = python_path
        if install_cmd is not None and (not isinstance(install_cmd, str) or not install_cmd.strip()):
            raise ComputeSpecError(f"image install_cmd must be a command like 'uv pip install'; got {install_cmd!r}")
        self.install_cmd = install_cmd
        self._steps: list[SetupStep] = []

    # ------------------------------------------------------------------ builders

    def from_docker(self, image_id: str) -> Image:
        """Use ``image_id`` as the base image."""
        self.image_id = check_image_id(image_id)
        return self

    def pip_install(self, reqs: list[str] | str, force: bool = False) -> Image:
        """Install Python packages (pip requirement specifiers) at start; ``force`` reinstalls."""
        items = [reqs] if isinstance(reqs, str) else reqs
        if not isinstance(items, (list, tuple)) or not items:
            raise ComputeSpecError(f"pip_install expects a list of requirements like ['numpy>=2']; got {reqs!r}")
        for req in items:
            if not isinstance(req, str) or not req.strip() or "\n" in req or "\0" in req:
                raise ComputeSpecError(
                    f"pip_install: {req!r} is not a requirement; write one per item, e.g. 'torch==2.4.0'")
        self._steps.append(SetupStep("pip_install", (tuple(r.strip() for r in items), bool(force))))
        return self

    def run_bash(self, command: str, force: bool = False) -> Image:
        """Run a shell command at start (once per container; ``force`` runs it every start)."""
        if not isinstance(command, str) or not command.strip():
            raise ComputeSpecError(f"run_bash expects a shell command like 'apt-get install -y git'; got {command!r}")
        self._steps.append(SetupStep("run_bash", (command, bool(force))))
        return self

    def set_env_vars(self, env_vars: dict[str, str]) -> Image:
        """Set environment variables in the container (``Compute.env_vars`` wins on a clash)."""
        env = check_env_vars(env_vars, "set_env_vars")
        if not env:
            raise ComputeSpecError("set_env_vars expects a non-empty dict like {'HF_HOME': '/data/hf'}")
        self._steps.append(SetupStep("set_env_vars", (tuple(env.items()),)))
        return self

    # ------------------------------------------------------------------ reading

    @property
    def steps(self) -> tuple[SetupStep, ...]:
        """The setup steps, in order."""
        return tuple(self._steps)

    @property
    def env_vars(self) -> dict[str, str]:
        """Environment variables set by :meth:`set_env_vars` steps (later steps win)."""
        env: dict[str, str] = {}
        for step in self._steps:
            if step.kind == "set_env_vars":
                env.update(dict(step.args[0]))
        return dict(sorted(env.items()))

    @property
    def setup_hash(self) -> str:
        """A stable hash of the setup steps (and install command): same steps, same hash."""
        data = {"install_cmd": self.install_cmd, "steps": [s.to_dict() for s in self._steps]}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (see :meth:`from_dict`)."""
        return {"name": self.name, "image_id": self.image_id, "python_path": self.python_path,
                "install_cmd": self.install_cmd, "steps": [s.to_dict() for s in self._steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Image:
        """Rebuild an Image from :meth:`to_dict` output."""
        if not isinstance(data, dict):
            raise ComputeSpecError(f"image must be an Image, an image name or a dict; got {data!r}")
        unknown = set(data) - {"name", "image_id", "python_path", "install_cmd", "steps"}
        if unknown:
            raise ComputeSpecError(f"image: unknown key(s) {sorted(unknown)}")
        image = cls(data.get("name"), data.get("image_id"), data.get("python_path"), data.get("install_cmd"))
        for step in data.get("steps") or []:
            kind, args = step.get("kind"), step.get("args") or []
            if kind == "pip_install":
                image.pip_install(list(args[0]), force=bool(args[1]) if len(args) > 1 else False)
            elif kind == "run_bash":
                image.run_bash(args[0], force=bool(args[1]) if len(args) > 1 else False)
            elif kind == "set_env_vars":
                image.set_env_vars(dict(args[0]))
            else:
                raise ComputeSpecError(f"image: unknown setup step {kind!r}; known: {', '.join(STEP_KINDS)}")
        return image

    def copy(self) -> Image:
        """An independent copy (a Compute keeps one, so later builder calls do not change it)."""
        return Image.from_dict(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        steps = "".join(f".{s.kind}(...)" for s in self._steps)
        return f"Image(image_id={self.image_id!r}){steps}"


def as_image(value: Image | str | dict[str, Any] | None) -> Image:
    """An Image from an Image (copied), an image name, a :meth:`Image.to_dict` dict or None (default)."""
    if value is None:
        return Image()
    if isinstance(value, Image):
        return value.copy()
    if isinstance(value, str):
        return Image(image_id=value)
    if isinstance(value, dict):
        return Image.from_dict(value)
    raise ComputeSpecError(
        f"image must be an Image (e.g. Image(image_id='python:3.11-slim')) or an image name; got {value!r}")


class images:  # lowercase: mirrors the seed's ``kt.images.Debian()`` namespace
    """Ready-made base images, as in the seed (``images.Debian()``, ``images.Python312()``, ...)."""

    @staticmethod
    def Debian() -> Image:
        """Debian with the notebook's Python version."""
        return Image(name="debian", image_id=DEFAULT_IMAGE_ID)

    @staticmethod
    def Python311() -> Image:
        """Python 3.11 (slim Debian)."""
        return Image(name="python311", image_id="python:3.11-slim")

    @staticmethod
    def Python312() -> Image:
        """Python 3.12 (slim Debian)."""
        return Image(name="python312", image_id="python:3.12-slim")

    @staticmethod
    def Python313() -> Image:
        """Python 3.13 (slim Debian)."""
        return Image(name="python313", image_id="python:3.13-slim")

    @staticmethod
    def pytorch() -> Image:
        """The official PyTorch runtime image (CUDA, cuDNN, torch preinstalled; Python 3.11)."""
        return Image(name="pytorch", image_id="pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime")

