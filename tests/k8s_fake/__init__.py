"""Test doubles for the Kubernetes backend: a fake API server, a fake kubelet, a fake connector.

Nothing here runs in production; every class is named Fake* so no reader
mistakes it for the real thing. The code under test (``KubernetesBackend``)
talks to :class:`FakeKubeApiServer` over real HTTP on 127.0.0.1 through the
official ``kubernetes`` client, and :class:`FakeKubelet` runs the pods'
containers as real local processes.
"""

from .api_server import FakeKubeApiServer
from .store import FakeStore
from .kubelet import FakeKubelet, FakeNode, FakePortForwardConnector
from .autoscaler import FakeClusterAutoscaler, FakeNodeGroup

__all__ = ["FakeClusterAutoscaler", "FakeKubeApiServer", "FakeKubelet", "FakeNode", "FakeNodeGroup",
           "FakePortForwardConnector", "FakeStore"]
