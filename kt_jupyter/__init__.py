"""kt_jupyter: run notebook cells on warm remote pod kernels.

``%load_ext kt_jupyter`` registers the ``%%kt`` and ``%kt`` magics. The
Python API mirrors kubetorch: ``import kt_jupyter as kt; kt.Compute(...)``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .compute import Compute
from .debugging import deep_breakpoint
from .errors import KtError, RemoteError
from .image import Image, images
from .k8s_fields import LoggingConfig, Secret, Volume
from .remote import Cls, Fn, RemoteObjectRef, cls, fn

__all__ = [
    "Cls",
    "Compute",
    "Fn",
    "Image",
    "KtError",
    "LoggingConfig",
    "RemoteError",
    "RemoteObjectRef",
    "Secret",
    "Volume",
    "__version__",
    "cls",
    "deep_breakpoint",
    "fn",
    "images",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: Any) -> None:
    """Register the kt magics (``%load_ext kt_jupyter``); see :mod:`kt_jupyter.magics`."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove what loading added (``%unload_ext kt_jupyter``); computes keep running."""
    from .magics import unload

    unload(ipython)
