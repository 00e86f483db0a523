"""GPU types as clusters label their nodes, and the node affinity that finds them. Pure.

Three labelling schemes are common, and a cluster may use any of them:

* NVIDIA GPU Feature Discovery (GPU Operator, most on-premise and EKS/AKS
  clusters): ``nvidia.com/gpu.product`` = the NVML device name with ``-``
  for spaces (``NVIDIA-A100-SXM4-80GB``, ``Tesla-T4``); ``nvidia.com/gpu.present``.
* GKE: ``cloud.google.com/gke-accelerator`` (``nvidia-tesla-a100``, ``nvidia-l4``).
* Karpenter on EKS: ``karpenter.k8s.aws/instance-gpu-name`` (``a100``, ``t4``).

``gpu_type`` is a short name (``"A100"``, ``"a100-80gb"``, ``"T4"``: see
:data:`GPU_MODELS`), one known label value (``"Tesla-T4"``), or an explicit
``"key: value"`` / ``"key=value"`` node label. A short name becomes a required
node affinity whose terms OR over the known values of all three keys, so the
same ``gpu_type`` schedules on any of those clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ComputeSpecError
from .k8s_fields import check_label_key, check_label_value

GFD_PRODUCT_LABEL = "nvidia.com/gpu.product"
GFD_PRESENT_LABEL = "nvidia.com/gpu.present"
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
KARPENTER_GPU_NAME_LABEL = "karpenter.k8s.aws/instance-gpu-name"
#: Karpenter's per-GPU memory in MiB: tells an A100 40GB (p4d) from an 80GB (p4de).
KARPENTER_GPU_MEMORY_LABEL = "karpenter.k8s.aws/instance-gpu-memory"
#: The label keys that name a node's GPU, one per labelling scheme.
GPU_LABEL_KEYS = (GFD_PRODUCT_LABEL, GKE_ACCELERATOR_LABEL, KARPENTER_GPU_NAME_LABEL)


@dataclass(frozen=True)
class GpuModel:
    """One GPU model and the label values each scheme gives its nodes."""

    name: str
    products: tuple[str, ...] = ()
    gke: tuple[str, ...] = ()
    karpenter: tuple[str, ...] = ()
    karpenter_memory_mib: tuple[str, ...] = ()

    def node_selector_terms(self) -> list[dict[str, Any]]:
        """One nodeSelectorTerm per scheme that knows this model (the terms are ORed)."""
        terms = []
        for key, values in ((GFD_PRODUCT_LABEL, self.products), (GKE_ACCELERATOR_LABEL, self.gke),
                            (KARPENTER_GPU_NAME_LABEL, self.karpenter)):
            if values:
                exprs = [_in(key, values)]
                if key == KARPENTER_GPU_NAME_LABEL and self.karpenter_memory_mib:
                    exprs.append(_in(KARPENTER_GPU_MEMORY_LABEL, self.karpenter_memory_mib))
                terms.append({"matchExpressions": exprs})
        return terms


_A100_40 = ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB")
_A100_80 = ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe")

#: Short names (matched case-insensitively) and the label values of their nodes.
GPU_MODELS: dict[str, GpuModel] = {m.name: m for m in (
    GpuModel("T4", ("Tesla-T4",), ("nvidia-tesla-t4",), ("t4",)),
    GpuModel("L4", ("NVIDIA-L4",), ("nvidia-l4",), ("l4",)),
    GpuModel("L40S", ("NVIDIA-L40S",), (), ("l40s",)),
    GpuModel("A10G", ("NVIDIA-A10G",), (), ("a10g",)),
    GpuModel("A10", ("NVIDIA-A10",)),
    GpuModel("P4", ("Tesla-P4",), ("nvidia-tesla-p4",)),
    GpuModel("P100", ("Tesla-P100-PCIE-16GB", "Tesla-P100-SXM2-16GB"), ("nvidia-tesla-p100",)),
    GpuModel("V100", ("Tesla-V100-SXM2-16GB", "Tesla-V100-SXM2-32GB", "Tesla-V100-PCIE-16GB",
                      "Tesla-V100-PCIE-32GB"), ("nvidia-tesla-v100",), ("v100",)),
    GpuModel("A100", _A100_40 + _A100_80, ("nvidia-tesla-a100", "nvidia-a100-80gb"), ("a100",)),
    GpuModel("A100-40GB", _A100_40, ("nvidia-tesla-a100",), ("a100",), ("40960",)),
    GpuModel("A100-80GB", _A100_80, ("nvidia-a100-80gb",), ("a100",), ("81920",)),
    GpuModel("H100", ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
             ("nvidia-h100-80gb", "nvidia-h100-mega-80gb"), ("h100",)),
    GpuModel("H200", ("NVIDIA-H200", "NVIDIA-H200-NVL"), ("nvidia-h200-141gb",), ("h200",)),
    GpuModel("B200", ("NVIDIA-B200",), ("nvidia-b200",), ("b200",)),
)}
_BY_UPPER = {name.upper(): model for name, model in GPU_MODELS.items()}
#: Every known label value -> the keys it is a value of.
_KNOWN_VALUES: dict[str, tuple[str, ...]] = {}
for _model in GPU_MODELS.values():
    for _key, _values in ((GFD_PRODUCT_LABEL, _model.products), (GKE_ACCELERATOR_LABEL, _model.gke),
                          (KARPENTER_GPU_NAME_LABEL, _model.karpenter)):
        for _value in _values:
            if _key not in _KNOWN_VALUES.get(_value, ()):
                _KNOWN_VALUES[_value] = _KNOWN_VALUES.get(_value, ()) + (_key,)


def _in(key: str, values: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {"key": key, "operator": "In", "values": list(values)}


def check_gpu_type(value: object, param: str = "gpu_type") -> str:
    """``gpu_type`` normalised: a known short name as spelled in :data:`GPU_MODELS`, a known
    label value as given, or an explicit label as ``"key=value"``; else a ComputeSpecError."""
    if not isinstance(value, str) or not value.strip():
        raise ComputeSpecError(f"{param} must name a GPU product like 'A100'; got {value!r}")
    text = value.strip()
    sep = ":" if ":" in text else "=" if "=" in text else None
    if sep:
        key, _, label = (part.strip() for part in text.partition(sep))
        check_label_key(key, param)
        check_label_value(label, param)
        if not label:
            raise ComputeSpecError(f"{param}: {value!r} names the label {key!r} but no value, e.g. "
                                   f"'{GFD_PRODUCT_LABEL}: NVIDIA-A100-SXM4-80GB'")
        return f"{key}={label}"
    check_label_value(text, param)
    model = _BY_UPPER.get(text.upper())
    if model is not None:
        return model.name
    if text in _KNOWN_VALUES:
        return text
    raise ComputeSpecError(
        f"{param} {value!r} is not a GPU kt_jupyter knows ({', '.join(GPU_MODELS)}); name your nodes' label "
        f"instead, e.g. {param}='{GFD_PRODUCT_LABEL}: NVIDIA-A100-SXM4-80GB' or "
        f"'{GKE_ACCELERATOR_LABEL}: nvidia-tesla-a100' (see `kubectl get nodes --show-labels`)")


def gpu_node_selector_terms(gpu_type: str) -> list[dict[str, Any]]:
    """The nodeSelectorTerms (ORed) of nodes that have ``gpu_type`` (as :func:`check_gpu_type` returns it)."""
    if gpu_type in GPU_MODELS:
        return GPU_MODELS[gpu_type].node_selector_terms()
    if "=" in gpu_type:
        key, _, value = gpu_type.partition("=")
        return [{"matchExpressions": [_in(key, [value])]}]
    return [{"matchExpressions": [_in(key, [gpu_type])]} for key in _KNOWN_VALUES[gpu_type]]


def gpu_type_from_terms(terms: list[dict[str, Any]]) -> str | None:
    """The ``gpu_type`` whose :func:`gpu_node_selector_terms` are ``terms``, if any."""
    for gpu_type in list(GPU_MODELS) + list(_KNOWN_VALUES):
        if gpu_node_selector_terms(gpu_type) == terms:
            return gpu_type
    exprs = (terms[0].get("matchExpressions") or []) if len(terms) == 1 and isinstance(terms[0], dict) else []
    one = exprs[0] if len(exprs) == 1 and isinstance(exprs[0], dict) else {}
    values = one.get("values")
    if one.get("operator") == "In" and isinstance(values, list) and len(values) == 1:
        return f"{one.get('key')}={values[0]}"  # checked again by check_gpu_type when the Compute is built
    return None


def gpu_type_allows(gpu_type: str, key: str, value: str) -> bool:
    """Whether a node labelled ``key=value`` can match ``gpu_type`` (for a node_selector on a GPU label)."""
    return any(e["key"] == key and value in e["values"]
               for term in gpu_node_selector_terms(gpu_type) for e in term["matchExpressions"])


def check_gpu_node_selector(gpu_type: str | None, node_selector: dict[str, str]) -> None:
    """Refuse a node_selector on a GPU label that no node of ``gpu_type`` can carry."""
    if not gpu_type:
        return
    for key in GPU_LABEL_KEYS:
        if key in node_selector and not gpu_type_allows(gpu_type, key, node_selector[key]):
            raise ComputeSpecError(
                f"gpu_type={gpu_type!r} and node_selector[{key!r}]={node_selector[key]!r} contradict each other; "
                "set only gpu_type")


def no_gpu_node_selector_term() -> dict[str, Any]:
    """The nodeSelectorTerm of nodes without a GPU under any of the three labelling schemes."""
    return {"matchExpressions": [
        {"key": GFD_PRESENT_LABEL, "operator": "NotIn", "values": ["true"]},
        *({"key": key, "operator": "DoesNotExist"} for key in GPU_LABEL_KEYS),
    ]}
