"""Pod Security admission as the real API server runs it (a test double of k8s.io/pod-security-admission).

:func:`pod_security_violations` applies the Pod Security Standards checks
that concern pods like ours (baseline: privileged, host namespaces, hostPath
volumes, host ports, non-default capabilities, Unconfined seccomp; restricted:
allowPrivilegeEscalation, capabilities, volume types, runAsNonRoot,
runAsUser, seccompProfile) and words each violation the way the real
admission plugin does, in its order: baseline checks, then restricted ones,
each level sorted by check ID, a restricted check replacing the baseline
check it tightens. :func:`forbidden_message` builds the whole rejection
(``pods "x" is forbidden: violates PodSecurity "restricted:latest": ...``),
the text a ReplicaSet's ``FailedCreate`` event carries.
"""

from __future__ import annotations

from typing import Any, Callable

LEVELS = ("privileged", "baseline", "restricted")
#: Capabilities the baseline level lets a container add.
BASELINE_CAPABILITIES = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                                   "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})
#: Volume sources the restricted level allows.
RESTRICTED_VOLUME_SOURCES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image",
                                       "persistentVolumeClaim", "projected", "secret"})
_VALID_SECCOMP = ("RuntimeDefault", "Localhost")

Check = Callable[[dict[str, Any]], "str | None"]


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container the checks visit, in the real visitor's order."""
    return [c for key in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(key) or []]


def _sc(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("securityContext") or {}


def _plural(one: str, many: str, n: int) -> str:
    return one if n == 1 else many


def _quote(items: list[str]) -> str:
    return ", ".join(f'"{i}"' for i in items)


def _who(names: list[str]) -> str:
    return f'{_plural("container", "containers", len(names))} {_quote(names)}'


# ---------------------------------------------------------------------- baseline

def _capabilities_baseline(spec: dict[str, Any]) -> str | None:
    bad, caps = [], set()
    for c in _containers(spec):
        added = [a for a in (_sc(c).get("capabilities") or {}).get("add") or [] if a not in BASELINE_CAPABILITIES]
        if added:
            bad.append(c["name"])
            caps.update(added)
    if bad:
        return f"non-default capabilities ({_who(bad)} must not include {_quote(sorted(caps))} in " \
               "securityContext.capabilities.add)"
    return None


def _host_namespaces(spec: dict[str, Any]) -> str | None:
    used = sorted(k for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k))
    return f"host namespaces ({', '.join(f'{k}=true' for k in used)})" if used else None


def _host_path_volumes(spec: dict[str, Any]) -> str | None:
    bad = [v["name"] for v in spec.get("volumes") or [] if "hostPath" in v]
    return f"hostPath volumes ({_plural('volume', 'volumes', len(bad))} {_quote(bad)})" if bad else None


def _host_ports(spec: dict[str, Any]) -> str | None:
    bad, ports = [], set()
    for c in _containers(spec):
        used = [str(p["hostPort"]) for p in c.get("ports") or [] if p.get("hostPort")]
        if used:
            bad.append(c["name"])
            ports.update(used)
    if bad:
        return (f"hostPort ({_who(bad)} {_plural('uses', 'use', len(bad))} "
                f"{_plural('hostPort', 'hostPorts', len(ports))} {', '.join(sorted(ports))})")
    return None


def _privileged(spec: dict[str, Any]) -> str | None:
    bad = [c["name"] for c in _containers(spec) if _sc(c).get("privileged") is True]
    return f"privileged ({_who(bad)} must not set securityContext.privileged=true)" if bad else None


def _bad_seccomp_setters(spec: dict[str, Any]) -> tuple[list[str], set[str]]:
    setters, values = [], set()
    pod_type = (_sc(spec).get("seccompProfile") or {}).get("type")
    if pod_type is not None and pod_type not in _VALID_SECCOMP:
        setters.append("pod")
        values.add(pod_type)
    bad = []
    for c in _containers(spec):
        kind = (_sc(c).get("seccompProfile") or {}).get("type")
        if kind is not None and kind not in _VALID_SECCOMP:
            bad.append(c["name"])
            values.add(kind)
    if bad:
        setters.append(_who(bad))
    return setters, values


def _seccomp_baseline(spec: dict[str, Any]) -> str | None:
    setters, values = _bad_seccomp_setters(spec)
    if setters:
        return (f"seccompProfile ({' and '.join(setters)} must not set securityContext.seccompProfile.type to "
                f"{_quote(sorted(values))})")
    return None


# ---------------------------------------------------------------------- restricted

def _allow_privilege_escalation(spec: dict[str, Any]) -> str | None:
    bad = [c["name"] for c in _containers(spec) if _sc(c).get("allowPrivilegeEscalation") is not False]
    if bad:
        return f"allowPrivilegeEscalation != false ({_who(bad)} must set securityContext.allowPrivilegeEscalation=false)"
    return None


def _capabilities_restricted(spec: dict[str, Any]) -> str | None:
    missing_drop, adding, caps = [], [], set()
    for c in _containers(spec):
        capabilities = _sc(c).get("capabilities")
        if capabilities is None:
            missing_drop.append(c["name"])
            continue
        if "ALL" not in (capabilities.get("drop") or []):
            missing_drop.append(c["name"])
        added = [a for a in capabilities.get("add") or [] if a != "NET_BIND_SERVICE"]
        if added:
            adding.append(c["name"])
            caps.update(added)
    details = []
    if missing_drop:
        details.append(f'{_who(missing_drop)} must set securityContext.capabilities.drop=["ALL"]')
    if adding:
        details.append(f"{_who(adding)} must not include {_quote(sorted(caps))} in securityContext.capabilities.add")
    return f"unrestricted capabilities ({'; '.join(details)})" if details else None


def _restricted_volumes(spec: dict[str, Any]) -> str | None:
    bad, kinds = [], set()
    for v in spec.get("volumes") or []:
        sources = [k for k in v if k != "name"]
        if any(s in RESTRICTED_VOLUME_SOURCES for s in sources):
            continue
        bad.append(v["name"])
        kinds.add(sources[0] if sources else "unknown")
    if bad:
        n = len(bad)
        return (f"restricted volume types ({_plural('volume', 'volumes', n)} {_quote(bad)} "
                f"{_plural('uses', 'use', n)} "
                f"{_plural('restricted volume type', 'restricted volume types', len(kinds))} {_quote(sorted(kinds))})")
    return None


def _run_as_non_root(spec: dict[str, Any]) -> str | None:
    setters: list[str] = []
    pod_value = _sc(spec).get("runAsNonRoot")
    if pod_value is False:
        setters.append("pod")
    explicit, implicit = [], []
    for c in _containers(spec):
        value = _sc(c).get("runAsNonRoot")
        if value is False:
            explicit.append(c["name"])
        elif value is None and pod_value is not True:
            implicit.append(c["name"])
    if explicit:
        setters.append(_who(explicit))
    details = []
    if setters:
        details.append(f"{' and '.join(setters)} must not set securityContext.runAsNonRoot=false")
    if implicit:
        details.append(f"pod or {_who(implicit)} must set securityContext.runAsNonRoot=true")
    return f"runAsNonRoot != true ({chr(10).join(details)})" if details else None


def _run_as_user(spec: dict[str, Any]) -> str | None:
    setters = ["pod"] if _sc(spec).get("runAsUser") == 0 else []
    bad = [c["name"] for c in _containers(spec) if _sc(c).get("runAsUser") == 0]
    if bad:
        setters.append(_who(bad))
    return f"runAsUser=0 ({' and '.join(setters)} must not set runAsUser=0)" if setters else None


def _seccomp_restricted(spec: dict[str, Any]) -> str | None:
    setters, values = _bad_seccomp_setters(spec)
    if setters:
        return (f"seccompProfile ({' and '.join(setters)} must not set securityContext.seccompProfile.type to "
                f"{_quote(sorted(values))})")
    pod_set = (_sc(spec).get("seccompProfile") or {}).get("type") in _VALID_SECCOMP
    implicit = [c["name"] for c in _containers(spec) if not pod_set and _sc(c).get("seccompProfile") is None]
    if implicit:
        return (f'seccompProfile (pod or {_who(implicit)} must set securityContext.seccompProfile.type to '
                '"RuntimeDefault" or "Localhost")')
    return None


#: (check id, level, check, the baseline check id it replaces), in the real registry's order.
_CHECKS: tuple[tuple[str, str, Check, str | None], ...] = (
    ("capabilities_baseline", "baseline", _capabilities_baseline, None),
    ("hostNamespaces", "baseline", _host_namespaces, None),
    ("hostPathVolumes", "baseline", _host_path_volumes, None),
    ("hostPorts", "baseline", _host_ports, None),
    ("privileged", "baseline", _privileged, None),
    ("seccompProfile_baseline", "baseline", _seccomp_baseline, None),
    ("allowPrivilegeEscalation", "restricted", _allow_privilege_escalation, None),
    ("capabilities_restricted", "restricted", _capabilities_restricted, "capabilities_baseline"),
    ("restrictedVolumes", "restricted", _restricted_volumes, "hostPathVolumes"),
    ("runAsNonRoot", "restricted", _run_as_non_root, None),
    ("runAsUser", "restricted", _run_as_user, None),
    ("seccompProfile_restricted", "restricted", _seccomp_restricted, "seccompProfile_baseline"),
)


def pod_security_violations(pod: dict[str, Any], level: str = "restricted") -> list[str]:
    """The violations of Pod Security ``level`` by ``pod`` (a Pod, or a pod template), worded as the API server does.

    An empty list means the pod is admitted at that level.
    """
    if level not in LEVELS:
        raise ValueError(f"Pod Security level must be one of {LEVELS}; got {level!r}")
    spec = pod.get("spec") or {}
    wanted = LEVELS[:LEVELS.index(level) + 1]
    active = [c for c in _CHECKS if c[1] in wanted]
    replaced = {c[3] for c in active if c[3]}
    return [v for cid, _, check, _ in active if cid not in replaced and (v := check(spec)) is not None]


def forbidden_message(pod_name: str, violations: list[str], level: str = "restricted",
                      version: str = "latest") -> str:
    """The API server's whole rejection of a pod, as a ReplicaSet's ``FailedCreate`` event quotes it."""
    return f'pods "{pod_name}" is forbidden: violates PodSecurity "{level}:{version}": {", ".join(violations)}'
