"""FakeClusterAutoscaler: the cluster-autoscaler's part in a pod's life, for the fake cluster (a test double).

The real scheduler marks a pod it cannot place Unschedulable within
milliseconds; the cluster autoscaler looks at such pods on its own loop
(about every 10 s), and for each either finds a node group whose template
node would fit it and grows that group — a ``TriggeredScaleUp`` event on the
pod, ``pod triggered scale-up: [{eks-gpu-nodes 0->1 (max: 4)}]``, then a
node that joins a while later, onto which the scheduler binds the pod — or
says why none would, in a ``NotTriggerScaleUp`` event: ``pod didn't trigger
scale-up: 1 node(s) didn't match Pod's node affinity/selector, 1 max node
group size reached``. Here the loop is a per-pod delay (``delay_s``, short in
tests) and the node joins after ``node_ready_s``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .pod_runtime import FakeNode

if TYPE_CHECKING:
    from .kubelet import FakeKubelet
    from .pod_runtime import FakePodRuntime


@dataclass
class FakeNodeGroup:
    """A node group the autoscaler may grow: its nodes' labels and allocatable resources, its size bounds."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    allocatable: dict[str, str] = field(default_factory=lambda: {"cpu": "8", "memory": "32Gi", "pods": "110"})
    max_size: int = 4
    size: int = 0

    def template(self) -> FakeNode:
        """What a new node of this group looks like (to the autoscaler's simulation, and once it joins)."""
        name = f"{self.name}-{self.size + 1}"
        return FakeNode(name=name, labels={"kubernetes.io/hostname": name, **self.labels},
                        allocatable=dict(self.allocatable))


class FakeClusterAutoscaler:
    """Grows node groups for the Unschedulable pods of a :class:`~k8s_fake.FakeKubelet`, with the real events."""

    def __init__(self, kubelet: "FakeKubelet", groups: list[FakeNodeGroup], *, delay_s: float = 0.5,
                 node_ready_s: float = 0.2) -> None:
        self.kubelet, self.groups = kubelet, groups
        self.delay_s, self.node_ready_s = delay_s, node_ready_s
        self._considered: set[str] = set()
        self._lock = threading.Lock()
        kubelet.autoscaler = self

    def unschedulable(self, pod: "FakePodRuntime") -> None:
        """The scheduler marked ``pod`` Unschedulable: look at it on the next loop (once per pod)."""
        with self._lock:
            if pod.uid in self._considered:
                return
            self._considered.add(pod.uid)
        self.kubelet.later(self.delay_s, lambda: self._consider(pod))

    def _consider(self, pod: "FakePodRuntime") -> None:
        if pod.stopping.is_set() or pod.node_name:
            return
        reasons: dict[str, int] = {}
        with self._lock:
            chosen = None
            for group in self.groups:
                misfit = self.kubelet.misfit(group.template(), pod, empty=True)
                if not misfit and group.size >= group.max_size:
                    misfit = ["max node group size reached"]
                for reason in misfit:
                    reasons[reason] = reasons.get(reason, 0) + 1
                if not misfit and chosen is None:
                    chosen = group
            if chosen is not None:
                node = chosen.template()
                chosen.size += 1
        if chosen is None:
            why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "no node groups"
            self._event(pod, "NotTriggerScaleUp", f"pod didn't trigger scale-up: {why}")
            return
        self._event(pod, "TriggeredScaleUp", f"pod triggered scale-up: [{{{chosen.name} {chosen.size - 1}->"
                                             f"{chosen.size} (max: {chosen.max_size})}}]")
        self.kubelet.later(self.node_ready_s, lambda: self.kubelet.add_node(node))

    def _event(self, pod: "FakePodRuntime", reason: str, message: str) -> None:
        self.kubelet.event(pod.ns, "Pod", pod.name, pod.uid, reason, message, "Normal", component="cluster-autoscaler")
