"""``Compute.autoscale(...)``: the settings of a Knative-autoscaled compute, validated when given. Pure.

The seed names ``min_replicas``, ``max_replicas`` and ``target_concurrency``;
the rest are Knative Serving's own knobs, named after its annotations
(``autoscaling.knative.dev/...``, see :meth:`AutoscalingConfig.annotations`).
Every value is checked against what Knative's admission webhook accepts, so a
bad one fails at the call with a message that names it, not at launch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ComputeSpecError
from .quantities import parse_duration

#: Annotation prefix of Knative's autoscaler settings (on the revision template).
ANNOTATION_PREFIX = "autoscaling.knative.dev/"
#: Knative's two autoscaler classes: the Knative Pod Autoscaler (concurrency, rps; scales to zero) and the HPA.
KPA_CLASS = "kpa.autoscaling.knative.dev"
HPA_CLASS = "hpa.autoscaling.knative.dev"
#: Metrics each class scales on.
KPA_METRICS = ("concurrency", "rps")
HPA_METRICS = ("cpu", "memory")
#: Bounds of the stable window Knative accepts.
WINDOW_MIN_S = 6
WINDOW_MAX_S = 3600
#: Longest scale-down delay Knative accepts.
SCALE_DOWN_DELAY_MAX_S = 3600


def _count(value: object, param: str, minimum: int, example: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ComputeSpecError(f"autoscale: {param} must be a whole number >= {minimum}, e.g. {param}={example}; "
                               f"got {value!r}")
    return value


def _positive(value: object, param: str, example: float, maximum: float | None = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 \
            or (maximum is not None and value > maximum):
        bound = f" and at most {maximum:g}" if maximum is not None else ""
        raise ComputeSpecError(f"autoscale: {param} must be a number above 0{bound}, e.g. {param}={example:g}; "
                               f"got {value!r}")
    return float(value)


def _seconds(value: object, param: str, example: str, minimum_s: int = 0, maximum_s: int | None = None) -> int | None:
    """A duration in whole seconds (Knative refuses sub-second precision); 0 where ``minimum_s`` allows it."""
    if value is None:
        return None
    zero = value in (0, "0", "0s") and not isinstance(value, bool)
    seconds = 0.0 if zero else parse_duration(value, f"autoscale: {param}")  # type: ignore[arg-type]
    if seconds != int(seconds):
        raise ComputeSpecError(f"autoscale: {param} must be whole seconds (Knative's precision), e.g. "
                               f"{param}={example!r}; got {value!r}")
    if seconds < minimum_s or (maximum_s is not None and seconds > maximum_s):
        upper = f" and {maximum_s} s" if maximum_s is not None else ""
        raise ComputeSpecError(f"autoscale: {param} must be between {minimum_s} s{upper}, e.g. {param}={example!r}; "
                               f"got {value!r}")
    return int(seconds)


def _autoscaler_class(value: object, metric: str | None) -> str:
    if value is None:
        return HPA_CLASS if metric in HPA_METRICS else KPA_CLASS
    short = {"kpa": KPA_CLASS, "hpa": HPA_CLASS, KPA_CLASS: KPA_CLASS, HPA_CLASS: HPA_CLASS}
    if not isinstance(value, str) or value.lower() not in short:
        raise ComputeSpecError(f"autoscale: autoscaler_class must be 'kpa' (Knative's, scales to zero) or 'hpa' "
                               f"(Kubernetes' HorizontalPodAutoscaler, for cpu/memory); got {value!r}")
    return short[value.lower()]


@dataclass(frozen=True)
class AutoscalingConfig:
    """How Knative scales a compute (every field optional; None leaves Knative's default).

    - ``min_replicas`` / ``max_replicas``: bounds (0 min = scale to zero; 0 max = unbounded).
    - ``target_concurrency``: the seed's name for ``metric="concurrency"`` with that ``target``.
    - ``metric`` ``concurrency`` | ``rps`` | ``cpu`` | ``memory`` and ``target`` (requests in flight,
      requests per second, millicores, MiB per pod); ``target_utilization`` percent of it to aim at.
    - ``window`` (6 s to 1 h), ``scale_down_delay`` (up to 1 h), ``scale_to_zero_pod_retention_period``:
      durations as ``"60s"``/``"5m"``/seconds.
    - ``initial_replicas``: pods at first deploy; ``container_concurrency``: a hard cap of requests per
      pod (a WebSocket session is one request for its whole life; 0 = no cap).
    - ``autoscaler_class`` ``kpa`` (default; concurrency/rps, can scale to zero) or ``hpa`` (cpu/memory).
    """

    min_replicas: int | None = None
    max_replicas: int | None = None
    metric: str | None = None
    target: float | None = None
    target_utilization: float | None = None
    window_s: int | None = None
    initial_replicas: int | None = None
    scale_down_delay_s: int | None = None
    scale_to_zero_pod_retention_period_s: int | None = None
    container_concurrency: int | None = None
    autoscaler_class: str = KPA_CLASS

    @classmethod
    def from_arguments(cls, *, min_replicas: Any = None, max_replicas: Any = None, target_concurrency: Any = None,
                       metric: Any = None, target: Any = None, target_utilization: Any = None, window: Any = None,
                       initial_replicas: Any = None, scale_down_delay: Any = None,
                       scale_to_zero_pod_retention_period: Any = None, container_concurrency: Any = None,
                       autoscaler_class: Any = None) -> AutoscalingConfig:
        """Validate ``autoscale()``'s arguments (see the class docstring) into a config."""
        low = _count(min_replicas, "min_replicas", 0, 0)
        high = _count(max_replicas, "max_replicas", 0, 10)
        if low is not None and high and low > high:
            raise ComputeSpecError(f"autoscale: min_replicas ({low}) is above max_replicas ({high}); "
                                   f"e.g. min_replicas=0, max_replicas={max(high, 1)}")
        if metric is not None and metric not in KPA_METRICS + HPA_METRICS:
            raise ComputeSpecError(f"autoscale: metric must be one of {', '.join(KPA_METRICS + HPA_METRICS)}; "
                                   f"got {metric!r}")
        concurrency = _positive(target_concurrency, "target_concurrency", 5)
        if concurrency is not None:
            if metric not in (None, "concurrency") or target is not None:
                raise ComputeSpecError("autoscale: target_concurrency is metric='concurrency' with that target; "
                                       "give either target_concurrency, or metric and target")
            metric, target = "concurrency", concurrency
        goal = _positive(target, "target", 100)
        klass = _autoscaler_class(autoscaler_class, metric)
        if klass == KPA_CLASS and metric in HPA_METRICS:
            raise ComputeSpecError(f"autoscale: metric={metric!r} needs autoscaler_class='hpa' (Knative's own "
                                   "autoscaler scales on concurrency or rps)")
        if klass == HPA_CLASS:
            if metric in KPA_METRICS:
                raise ComputeSpecError(f"autoscale: autoscaler_class='hpa' scales on cpu or memory, not {metric!r}")
            if low == 0:
                raise ComputeSpecError("autoscale: the HPA cannot scale to zero; use min_replicas=1 or "
                                       "autoscaler_class='kpa'")
            kpa_only = [p for p, v in (("window", window),
                                       ("scale_to_zero_pod_retention_period", scale_to_zero_pod_retention_period))
                        if v is not None]
            if kpa_only:
                raise ComputeSpecError(f"autoscale: {kpa_only[0]} is a setting of Knative's own autoscaler "
                                       "(autoscaler_class='kpa'); the HPA does not read it")
        return cls(
            min_replicas=low, max_replicas=high, metric=metric, target=goal,
            target_utilization=_positive(target_utilization, "target_utilization", 70, maximum=100),
            window_s=_seconds(window, "window", "60s", WINDOW_MIN_S, WINDOW_MAX_S),
            initial_replicas=_count(initial_replicas, "initial_replicas", 0, 1),
            scale_down_delay_s=_seconds(scale_down_delay, "scale_down_delay", "5m", 0, SCALE_DOWN_DELAY_MAX_S),
            scale_to_zero_pod_retention_period_s=_seconds(scale_to_zero_pod_retention_period,
                                                          "scale_to_zero_pod_retention_period", "10m"),
            container_concurrency=_count(container_concurrency, "container_concurrency", 0, 1),
            autoscaler_class=klass,
        )

    def annotations(self) -> dict[str, str]:
        """The ``autoscaling.knative.dev/*`` annotations of the revision template (values as Knative reads them)."""
        values = {
            "class": self.autoscaler_class,
            "min-scale": self.min_replicas, "max-scale": self.max_replicas, "initial-scale": self.initial_replicas,
            "metric": self.metric, "target": self.target, "target-utilization-percentage": self.target_utilization,
            "window": self.window_s, "scale-down-delay": self.scale_down_delay_s,
            "scale-to-zero-pod-retention-period": self.scale_to_zero_pod_retention_period_s,
        }
        durations = ("window", "scale-down-delay", "scale-to-zero-pod-retention-period")
        out = {}
        for key, value in values.items():
            if value is None:
                continue
            out[ANNOTATION_PREFIX + key] = (f"{value}s" if key in durations
                                            else f"{value:g}" if isinstance(value, float) else str(value))
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (those set); :meth:`from_dict` rebuilds an equal config."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> AutoscalingConfig:
        """The config of :meth:`to_dict` output (e.g. a spec sent over REST), validated again."""
        if isinstance(data, AutoscalingConfig):
            return data
        if not isinstance(data, dict):
            raise ComputeSpecError(f"autoscaling must be a dict like {{'min_replicas': 0, 'max_replicas': 5}}; "
                                   f"got {type(data).__name__}")
        renamed = {"window_s": "window", "scale_down_delay_s": "scale_down_delay",
                   "scale_to_zero_pod_retention_period_s": "scale_to_zero_pod_retention_period"}
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ComputeSpecError(f"autoscaling: unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls.from_arguments(**{renamed.get(str(k), str(k)): v for k, v in data.items()})
