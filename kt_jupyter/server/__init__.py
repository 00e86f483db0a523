"""The Jupyter server extension behind the JupyterLab sidebar of computes.

REST under ``/kt/api/`` (see :mod:`kt_jupyter.server.handlers`); enabled on
``pip install`` by ``jupyter-config/jupyter_server_config.d/kt_jupyter.json``.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """Where jupyter_server finds this extension: one ExtensionApp."""
    from .app import KtServerApp

    return [{"module": "kt_jupyter.server", "app": KtServerApp}]
