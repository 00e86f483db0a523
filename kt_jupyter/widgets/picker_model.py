"""State of the compute picker: the form's values, the Compute they make (or why not), what runs.

Pure state plus the three actions the picker offers (launch, make default,
stop); no ipywidgets import, so it is tested without a frontend.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Mapping
from typing import Any

from traitlets import Any as AnyTrait
from traitlets import Bool, Enum, HasTraits, Tuple, Unicode, observe, validate

from .. import connection as conn_mod
from ..backends import BACKENDS, get_backend
from ..compute import Compute
from ..errors import BackendUnavailable, ComputeSpecError, KtError
from .models import is_launch_event

#: Form fields, in the order the form shows them, and their magic option names.
FIELDS = ("name", "cpus", "memory", "gpus", "gpu_type", "image", "namespace")
OPTIONS = {"name": "--name", "cpus": "--cpus", "memory": "--memory", "gpus": "--gpus", "gpu_type": "--gpu-type",
           "image": "--image", "namespace": "--namespace", "backend": "--backend"}
#: Fields only the Kubernetes backend uses.
KUBERNETES_ONLY = ("gpu_type", "image", "namespace")
#: GPU products offered in the GPU type box (free text is accepted too).
GPU_TYPES = ("A100", "H100", "H200", "L4", "L40S", "T4", "V100", "A10G")


def magic_line(values: Mapping[str, str], backend: str = "local") -> str:
    """The ``%%kt ...`` line that asks for these values (empty ones, and those the backend ignores, left out)."""
    parts = ["%%kt"]
    for key in FIELDS:
        if backend == "local" and key in KUBERNETES_ONLY:
            continue
        value = str(values.get(key) or "").strip()
        if value and not (key == "gpus" and value == "0"):
            parts += [OPTIONS[key], shlex.quote(value)]
    if backend != "local":
        parts += ["--backend", shlex.quote(backend)]
    return " ".join(parts)


def field_of_error(message: str) -> str:
    """Which form field an error message is about ('' when it names none)."""
    head = message.split(":", 1)[0].split("=", 1)[0].split(" ", 1)[0].strip().lower()
    aliases = {"gpu_type": "gpu_type", "gpu-type": "gpu_type", "env_vars": ""}
    if head in aliases:
        return aliases[head]
    return head if head in FIELDS else ""


def _text(value: Any) -> str:
    if value is None or value == 0 and not isinstance(value, bool):
        return ""
    if isinstance(value, Mapping):  # an Image as a dict
        return str(value.get("image_id") or value.get("name") or "")
    image_id = getattr(value, "image_id", None)
    if image_id is not None:
        return str(image_id)
    return str(value)


class PickerModel(HasTraits):
    """The picker's form values, the Compute they make, and the running computes."""

    backend = Enum(BACKENDS, default_value="local", help="Where to run: local subprocess or Kubernetes pod.")
    name = Unicode("default", help="Compute name; the same name reaches the same warm kernel.")
    cpus = Unicode(help="CPU request as typed, e.g. '2' or '500m'; '' for the backend's default.")
    memory = Unicode(help="Memory request as typed, e.g. '4Gi'; '' for the backend's default.")
    gpus = Unicode(help="Number of GPUs as typed, e.g. '1'; '' or '0' for none.")
    gpu_type = Unicode(help="GPU product, e.g. 'A100' (Kubernetes node selector).")
    image = Unicode(help="Container image (Kubernetes).")
    namespace = Unicode(help="Kubernetes namespace.")

    compute = AnyTrait(None, allow_none=True, help="The Compute the values make, or None when they are invalid.")
    error = Unicode(help="What is wrong with the values (shown inline), '' when they are valid.")
    error_field = Unicode(help="The field the error is about, '' when not one field.")
    line = Unicode(help="The equivalent `%%kt ...` line to copy.")
    disabled_fields = Tuple(help="Fields the chosen backend does not use.")
    default_label = Unicode(help="The current default compute, as 'name (backend)'.")

    running = Tuple(help="Computes of every backend (KernelInfo rows).")
    list_errors = Tuple(help="One message per backend that could not be listed.")
    busy = Bool(False, help="Whether a launch or stop is under way.")
    message = Unicode(help="The outcome of the last action.")
    message_kind = Enum(("info", "success", "error"), default_value="info", help="How to show the message.")

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._lock = threading.Lock()
        self._rebuild()
        self._show_default()

    @classmethod
    def from_compute(cls, compute: Compute, **kw: Any) -> PickerModel:
        """A picker filled in from ``compute`` (e.g. the current default)."""
        d = compute.to_dict() if hasattr(compute, "to_dict") else {}
        values = {k: _text(d.get(k, getattr(compute, k, None))) for k in FIELDS}
        backend = d.get("backend") or getattr(compute, "backend", "local")
        return cls(backend=backend, **values, **kw)

    @validate(*FIELDS)
    def _strip(self, proposal: Any) -> str:
        return str(proposal["value"]).strip()

    @observe("backend", *FIELDS)
    def _rebuild(self, _change: Any = None) -> None:
        values = {k: getattr(self, k) for k in FIELDS}
        kwargs: dict[str, Any] = {k: v for k, v in values.items() if v != ""}
        kwargs["backend"] = self.backend
        with self.hold_trait_notifications():
            self.disabled_fields = KUBERNETES_ONLY if self.backend == "local" else ()
            self.line = magic_line(values, self.backend)
            if not values["name"]:
                self.compute, self.error, self.error_field = None, "name: give the compute a name, e.g. 'train'", "name"
                return
            try:
                compute = Compute(**kwargs)
            except (ComputeSpecError, TypeError, ValueError) as exc:
                self.compute = None
                self.error = str(exc)
                self.error_field = field_of_error(str(exc))
                return
            self.compute, self.error, self.error_field = compute, "", ""
            if hasattr(compute, "magic_line"):
                self.line = compute.magic_line()

    def _show_default(self) -> None:
        d = conn_mod.default_compute()
        self.default_label = f"{d.name} ({d.backend})"

    # ------------------------------------------------------------------ actions

    def refresh_running(self) -> None:
        """List the computes of every backend; a backend that cannot be listed adds a message."""
        rows, errors = [], []
        for name in BACKENDS:
            try:
                rows += get_backend(name).list()
            except BackendUnavailable as exc:
                errors.append(f"{name}: {exc}")
            except Exception as exc:  # one broken backend must not hide the others
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
        with self.hold_trait_notifications():
            self.running = tuple(rows)
            self.list_errors = tuple(errors)

    def make_default(self) -> bool:
        """Make the form's compute the default for ``%%kt`` cells with no options."""
        if self.compute is None:
            self._say(f"cannot use these values: {self.error}", "error")
            return False
        conn_mod.set_default_compute(self.compute)
        self._show_default()
        self._say(f"'{self.compute.name}' is now the default for %%kt cells without options", "success")
        return True

    def launch(self, on_event: Callable[[str], None] | None = None) -> Any:
        """Start (or reattach to) the form's compute and make it the default; errors become the message.

        Blocks until the kernel is ready; the picker calls it from a thread.
        Returns the ComputeConnection, or None when it failed.
        """
        compute = self.compute
        if compute is None:
            self._say(f"cannot launch: {self.error}", "error")
            return None
        with self._lock:
            if self.busy:
                return None
            self.busy = True
        self._say(f"launching '{compute.name}' ({compute.backend})…", "info")
        notices: list[str] = []

        def event(text: str) -> None:
            if not is_launch_event(text):
                notices.append(text.strip())  # e.g. "already running with other settings"
            if on_event is not None:
                on_event(text)

        try:
            conn = conn_mod.connect(compute, on_event=event)
            conn_mod.set_default_compute(compute)
            self._show_default()
            where = getattr(conn.handle, "where", "") or compute.backend
            self._say("\n".join([f"'{compute.name}' is ready ({where}) and is now the default for %%kt cells"]
                                + notices), "success")
            return conn
        except KtError as exc:
            self._say(f"launch of '{compute.name}' failed: {exc}", "error")
            return None
        except Exception as exc:  # shown inline, never as a traceback from a button
            self._say(f"launch of '{compute.name}' failed: {type(exc).__name__}: {exc}", "error")
            return None
        finally:
            self.busy = False
            self.refresh_running()

    def use(self, info: Any) -> None:
        """Fill the form from a running compute and make it the default."""
        spec = dict(info.spec or {})
        with self.hold_trait_notifications():
            self.backend = info.backend
            for key in FIELDS:
                setattr(self, key, _text(spec.get(key)) if key != "name" else info.name)
        self.make_default()

    def stop(self, backend: str, name: str) -> bool:
        """Stop a compute and delete everything of it; the outcome becomes the message."""
        try:
            conn_mod.disconnect(name, backend)
            existed = get_backend(backend).delete(name)
            said = f"'{name}' ({backend}) {'stopped' if existed else 'was not running'}"
            default = conn_mod.default_compute()
            if (default.backend, default.name) == (backend, name):  # never relaunch an empty kernel silently
                if (default.backend, default.name) != ("local", "default"):
                    conn_mod.set_default_compute(Compute())
                    self._show_default()
                said += (f"; %%kt cells without options now start a new, empty '{conn_mod.default_compute().name}' "
                         f"({conn_mod.default_compute().backend})")
            self._say(said, "info")
            return existed
        except Exception as exc:
            self._say(f"could not stop '{name}': {exc}", "error")
            return False
        finally:
            self.refresh_running()

    def _say(self, message: str, kind: str) -> None:
        with self.hold_trait_notifications():
            self.message = message
            self.message_kind = kind
