"""The pod's startup script, run for real the way a hardened cluster runs it: as a uid with no
home (restricted pods run as uid 1000 with no passwd entry, HOME=/) on Debian's own Python, which
is PEP 668 "externally managed". A setup step pip-installs a package, the next step imports it,
the notebook's proxy settings are extended so in-cluster traffic skips the proxy, and the pod
kernel starts. Skipped where there is no such Python or we cannot switch user."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

from kt_jupyter.compute import Compute
from kt_jupyter.image import Image
from kt_jupyter.startup import INSTALL_ENV_VARS, startup_script

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PY = Path("/usr/bin/python3")
UID = 1000
START_TIMEOUT_S = 60.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not SYSTEM_PY.exists() or not list(
        Path("/usr/lib").glob("python3.*/EXTERNALLY-MANAGED")),
    reason="needs root (to run as uid 1000), setpriv and a PEP 668 system Python")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("KT_POD_IMAGE", *INSTALL_ENV_VARS):
        monkeypatch.delenv(var, raising=False)


def make_wheel(where: Path) -> Path:
    """A one-module wheel, built by hand so nothing is downloaded."""
    wheel = where / "ktprobe-1.0-py3-none-any.whl"
    files = {"ktprobe.py": "VALUE = 42\n",
             "ktprobe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: ktprobe\nVersion: 1.0\n",
             "ktprobe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: kt-test\nRoot-Is-Purelib: true\n"
                                            "Tag: py3-none-any\n"}
    files["ktprobe-1.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + \
        "ktprobe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


def deps_dir(where: Path) -> Path:
    """The notebook's own packages (the pod kernel's dependencies at its versions), without pip and setuptools,
    so the system Python's pip does the installing."""
    site = Path(sysconfig.get_paths()["purelib"])
    out = where / "deps"
    out.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(("pip", "setuptools", "_distutils_hack", "distutils-precedence")):
            (out / entry.name).symlink_to(entry)
    return out


def as_uid(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", *argv]


def test_startup_script_on_a_pep668_python_as_a_uid_without_home():
    with tempfile.TemporaryDirectory(prefix="kt-startup-") as top:
        base = Path(top)
        base.chmod(0o755)
        cache, tmp = base / "cache", base / "tmp"
        for d in (cache, tmp):
            d.mkdir()
            os.chown(d, UID, UID)
        wheel, deps = make_wheel(base), deps_dir(base)
        env = {"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8", "KT_TOKEN": "t0ken", "KT_PORT": "0",
               "KT_SRC_DIR": str(ROOT), "KT_CACHE_DIR": str(cache), "TMPDIR": str(tmp), "PYTHONPATH": str(deps),
               "PIP_NO_INDEX": "1", "HTTPS_PROXY": "http://proxy.invalid:3128", "NO_PROXY": "corp.example",
               "KUBERNETES_SERVICE_HOST": "10.96.0.1"}

        # the interpreter really is externally managed: a plain user install is refused
        refused = subprocess.run(as_uid([str(SYSTEM_PY), "-m", "pip", "install", "--user", str(wheel)]),
                                 env={k: v for k, v in env.items() if k != "HTTPS_PROXY"},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr

        image = (Image(python_path=str(SYSTEM_PY)).pip_install([str(wheel)])
                 .run_bash(f'{SYSTEM_PY} -c "import ktprobe; print(\'probe\', ktprobe.VALUE)" && '
                           'echo "home=$HOME no_proxy=$NO_PROXY user=$USER"'))
        compute = Compute(name="pep668", backend="kubernetes", namespace="ml", image=image)
        script = startup_script(compute).replace("--host ::", "--host 127.0.0.1")  # as the fake kubelet does
        read_fd, write_fd = os.pipe()
        log_path = base / "pod.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(as_uid(["/bin/sh", "-c", script]), env={**env, "KT_READY_FD": str(write_fd)},
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    pass_fds=(write_fd,), start_new_session=True, cwd=base)
        os.close(write_fd)
        try:
            deadline, line = time.monotonic() + START_TIMEOUT_S, b""
            while b"\n" not in line and time.monotonic() < deadline:
                ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(read_fd, 4096) if ready else b""
                if not chunk:
                    break
                line += chunk
            text = log_path.read_text()
            assert b"\n" in line, f"the pod kernel did not start:\n{text}"
            assert json.loads(line.split(b"\n", 1)[0])["port"] > 0
        finally:
            os.close(read_fd)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        assert "probe 42" in text, text
        assert f"home={cache}/home " in text and " user=kt" in text
        assert "no_proxy=corp.example,localhost,127.0.0.1,::1,.svc,.cluster.local,10.96.0.1 " in text
        assert list((cache / "user" / "lib").glob("python3.*/site-packages/ktprobe.py"))
        assert list(tmp.glob(f".kt-setup-{compute.image.setup_hash}"))  # once per container: the marker is there
        assert "installing pod kernel dependencies" not in text  # the notebook's versions were already importable
