"""The Kubernetes-facing parts of a Compute spec: names, labels, tolerations,
secrets, volumes, logging options, and where the namespace comes from.

All checks are pure and raise :class:`~kt_jupyter.errors.ComputeSpecError`
naming the parameter, the bad value and a good one. Only
:func:`resolve_namespace` reads files, and only the ones it is pointed at.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ComputeSpecError
from .quantities import parse_memory

#: Where Kubernetes puts the pod's own namespace inside a pod.
SERVICE_ACCOUNT_NAMESPACE_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_SECRET_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")
_ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
_TOLERATION_KEYS = {"key": "key", "operator": "operator", "value": "value", "effect": "effect",
                    "tolerationSeconds": "tolerationSeconds", "toleration_seconds": "tolerationSeconds"}
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_RESERVED_VOLUME_NAMES = ("dshm",)
_LOG_LEVELS = ("debug", "info", "warning", "error")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


# ---------------------------------------------------------------------- names

def dns1123_label(text: str) -> str:
    """``text`` cleaned into a DNS-1123 label that also starts with a letter (a valid Service name).

    Lowercased; other characters become ``-``; runs of ``-`` collapse; at most 63 characters.
    """
    cleaned = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")
    if not cleaned[:1].isalpha():
        cleaned = f"kt-{cleaned}".rstrip("-")
    return cleaned[:63].rstrip("-")


def check_dns_label(value: object, param: str) -> str:
    """A DNS-1123 label (namespaces, volume names): lowercase letters, digits and '-', at most 63."""
    if not isinstance(value, str) or len(value) > 63 or not _DNS_LABEL_RE.fullmatch(value):
        raise ComputeSpecError(
            f"{param} {value!r} is not a valid Kubernetes name: use at most 63 lowercase letters, digits "
            f"and '-', starting and ending with a letter or digit, e.g. {dns1123_label(str(value)) or 'ml-team'!r}")
    return value


def check_dns_subdomain(value: object, param: str) -> str:
    """A DNS-1123 subdomain (service accounts, secrets, priority classes): dot-separated labels, at most 253."""
    if not isinstance(value, str) or not value or len(value) > 253 or \
            not all(_DNS_LABEL_RE.fullmatch(part) for part in value.split(".")):
        raise ComputeSpecError(
            f"{param} {value!r} is not a valid Kubernetes name: lowercase letters, digits, '-' and '.', "
            "at most 253 characters, e.g. 'ml-runner'")
    return value


def check_label_key(key: object, param: str) -> str:
    """A label or annotation key: ``[prefix/]name``, prefix a DNS subdomain, name at most 63."""
    if isinstance(key, str) and key:
        prefix, _, name = key.rpartition("/")
        if (not prefix or (len(prefix) <= 253 and all(_DNS_LABEL_RE.fullmatch(p) for p in prefix.split(".")))) \
                and name and len(name) <= 63 and _LABEL_NAME_RE.fullmatch(name):
            return key
    raise ComputeSpecError(
        f"{param}: {key!r} is not a valid key: an optional DNS prefix and '/', then up to 63 letters, digits, "
        "'-', '_' or '.', starting and ending with a letter or digit, e.g. 'team' or 'example.com/team'")


def check_label_value(value: object, param: str) -> str:
    """A label value: at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends (or empty)."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_NAME_RE.fullmatch(value):
        raise ComputeSpecError(
            f"{param}: {value!r} is not a valid label value: up to 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit, e.g. 'ml-research'")
    return value


def check_bool(value: object, param: str) -> bool:
    """True/False, also from ``"true"``/``"false"``/``"yes"``/``"no"``/``1``/``0`` (as magics pass them)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ComputeSpecError(f"{param} must be True or False; got {value!r}")


def check_string_map(value: object, param: str, values: str = "label",
                     reserved: tuple[str, ...] = ()) -> dict[str, str]:
    """A dict of label keys to label values (``values="label"``) or to any string (``"any"``).

    A string ``"k=v,k2=v2"`` is accepted too (as magics pass it). Keys in
    ``reserved`` are refused. The result is sorted by key.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if any(not sep for _, sep, _ in pairs):
            raise ComputeSpecError(f"{param} must be a dict or 'key=value,key2=value2'; got {value!r}")
        value = {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict):
        raise ComputeSpecError(f"{param} must be a dict like {{'team': 'ml-research'}}; got {value!r}")
    out: dict[str, str] = {}
    for key, val in value.items():
        check_label_key(key, param)
        if key in reserved:
            raise ComputeSpecError(f"{param}: {key!r} is set by kt_jupyter itself; choose another key")
        if values == "label":
            out[key] = check_label_value(val, f"{param}[{key!r}]")
        elif isinstance(val, (str, int, float, bool)):
            out[key] = ("true" if val else "false") if isinstance(val, bool) else str(val)
        else:
            raise ComputeSpecError(f"{param}[{key!r}] must be a string; got {val!r}")
    return dict(sorted(out.items()))


def check_tolerations(value: object) -> list[dict[str, Any]]:
    """Tolerations as Kubernetes spells them (``toleration_seconds`` accepted for ``tolerationSeconds``)."""
    if value is None:
        return []
    example = "[{'key': 'dedicated', 'operator': 'Equal', 'value': 'ml', 'effect': 'NoSchedule'}]"
    if not isinstance(value, (list, tuple)):
        raise ComputeSpecError(f"tolerations must be a list of dicts like {example}; got {value!r}")
    out: list[dict[str, Any]] = []
    for i, tol in enumerate(value):
        where = f"tolerations[{i}]"
        if not isinstance(tol, dict):
            raise ComputeSpecError(f"{where} must be a dict like {example[1:-1]}; got {tol!r}")
        unknown = sorted(set(tol) - set(_TOLERATION_KEYS))
        if unknown:
            raise ComputeSpecError(
                f"{where}: unknown key {unknown[0]!r}; a toleration has key, operator, value, effect, "
                "tolerationSeconds")
        t: dict[str, Any] = {_TOLERATION_KEYS[k]: v for k, v in tol.items() if v is not None}
        op = t.setdefault("operator", "Equal")
        if op not in ("Equal", "Exists"):
            raise ComputeSpecError(f"{where}: operator must be 'Equal' or 'Exists'; got {op!r}")
        if "key" in t:
            check_label_key(t["key"], f"{where}.key")
        elif op == "Equal":
            raise ComputeSpecError(f"{where}: operator 'Equal' needs a key (or use operator 'Exists')")
        if op == "Exists" and t.get("value"):
            raise ComputeSpecError(f"{where}: operator 'Exists' takes no value; drop value or use 'Equal'")
        if "value" in t:
            t["value"] = check_label_value(t["value"], f"{where}.value")
        if "effect" in t and t["effect"] not in _EFFECTS:
            raise ComputeSpecError(f"{where}: effect must be one of {', '.join(_EFFECTS)}; got {t['effect']!r}")
        if "tolerationSeconds" in t:
            secs = t["tolerationSeconds"]
            if isinstance(secs, bool) or not isinstance(secs, int) or t.get("effect") != "NoExecute":
                raise ComputeSpecError(
                    f"{where}: tolerationSeconds must be whole seconds (e.g. 300) and needs effect 'NoExecute'")
        out.append({k: t[k] for k in ("key", "operator", "value", "effect", "tolerationSeconds") if k in t})
    return out


def check_abs_path(value: object, param: str, example: str) -> str:
    """An absolute POSIX path (trailing '/' dropped), or an error naming ``param``."""
    if not isinstance(value, str) or not value.startswith("/") or value.rstrip("/") == "":
        raise ComputeSpecError(f"{param} must be an absolute path like {example!r}; got {value!r}")
    return value.rstrip("/")


# ---------------------------------------------------------------------- secrets, volumes, logging

#: Conventional Kubernetes Secrets for ``Secret.from_provider``: where they land in the pod.
#: Where provider Secrets are mounted: not under /root (0700), which the pod's uid 1000 cannot read.
PROVIDER_MOUNT_DIR = "/var/run/secrets/kt"
PROVIDERS: dict[str, dict[str, Any]] = {
    "aws": {"mount_path": f"{PROVIDER_MOUNT_DIR}/aws"},
    "gcp": {"mount_path": f"{PROVIDER_MOUNT_DIR}/gcp"},
    "azure": {"mount_path": f"{PROVIDER_MOUNT_DIR}/azure"},
    "huggingface": {"env_vars": {"HF_TOKEN": "token"}},
    "openai": {"env_vars": {"OPENAI_API_KEY": "api_key"}},
    "anthropic": {"env_vars": {"ANTHROPIC_API_KEY": "api_key"}},
    "wandb": {"env_vars": {"WANDB_API_KEY": "api_key"}},
    "github": {"env_vars": {"GITHUB_TOKEN": "token"}},
}
#: Environment the provider's tools read to find a mounted Secret's files: variable -> file in the mount
#: ('' for the mount itself).
PROVIDER_FILE_ENV: dict[str, dict[str, str]] = {
    "aws": {"AWS_SHARED_CREDENTIALS_FILE": "credentials", "AWS_CONFIG_FILE": "config"},
    "gcp": {"GOOGLE_APPLICATION_CREDENTIALS": "application_default_credentials.json"},
    "azure": {"AZURE_CONFIG_DIR": ""},
}


@dataclass(frozen=True)
class Secret:
    """A Kubernetes Secret the pod uses, by name: mounted at ``mount_path``, or
    some keys as environment variables (``env_vars={"ENV_NAME": "secret-key"}``),
    or else every key as an environment variable."""

    name: str
    mount_path: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    provider: str | None = None

    def __post_init__(self) -> None:
        check_dns_subdomain(self.name, "secrets: name")
        if self.mount_path is not None:
            object.__setattr__(self, "mount_path",
                               check_abs_path(self.mount_path, f"secret {self.name!r} mount_path", "/etc/creds"))
        if not isinstance(self.env_vars, dict):
            raise ComputeSpecError(f"secret {self.name!r} env_vars must map ENV_NAME to a key of the secret")
        for env, key in self.env_vars.items():
            if not isinstance(env, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", env) or \
                    not isinstance(key, str) or not _SECRET_KEY_RE.fullmatch(key):
                raise ComputeSpecError(
                    f"secret {self.name!r} env_vars: {env!r}: {key!r} must map an environment variable name to "
                    "a key of the secret, e.g. {'HF_TOKEN': 'token'}")
        object.__setattr__(self, "env_vars", dict(sorted(self.env_vars.items())))

    @classmethod
    def from_name(cls, name: str, mount_path: str | None = None,
                  env_vars: dict[str, str] | None = None) -> Secret:
        """An existing Kubernetes Secret in the compute's namespace."""
        return cls(name=name, mount_path=mount_path, env_vars=env_vars or {})

    @classmethod
    def from_provider(cls, provider: str) -> Secret:
        """The conventional Secret ``kt-{provider}`` of a known provider (see :data:`PROVIDERS`)."""
        if provider not in PROVIDERS:
            raise ComputeSpecError(f"unknown secret provider {provider!r}; known: {', '.join(sorted(PROVIDERS))}")
        return cls(name=f"kt-{provider}", provider=provider, **PROVIDERS[provider])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)

    def file_env(self) -> dict[str, str]:
        """For a mounted provider Secret: the variables that point its tools at the files (e.g. AWS_CONFIG_FILE)."""
        if not self.mount_path or self.provider not in PROVIDER_FILE_ENV:
            return {}
        return {var: f"{self.mount_path}/{file}" if file else self.mount_path
                for var, file in PROVIDER_FILE_ENV[self.provider].items()}


@dataclass(frozen=True)
class Volume:
    """A PersistentVolumeClaim mounted at ``mount_path`` (default ``/mnt/{name}``).

    With ``size`` the claim is created with the compute; without, it must exist.
    """

    name: str
    size: str | None = None
    mount_path: str | None = None
    storage_class: str | None = None
    access_mode: str = "ReadWriteOnce"

    def __post_init__(self) -> None:
        check_dns_label(self.name, "volumes: name")
        if self.name in _RESERVED_VOLUME_NAMES or self.name.startswith("kt-"):
            raise ComputeSpecError(f"volume name {self.name!r} is reserved by kt_jupyter; choose another, e.g. 'data'")
        if self.size is not None:
            object.__setattr__(self, "size", parse_memory(self.size, f"volume {self.name!r} size")[1])
        path = self.mount_path if self.mount_path is not None else f"/mnt/{self.name}"
        object.__setattr__(self, "mount_path", check_abs_path(path, f"volume {self.name!r} mount_path", "/data"))
        if self.storage_class is not None:
            check_dns_subdomain(self.storage_class, f"volume {self.name!r} storage_class")
        if self.access_mode not in _ACCESS_MODES:
            raise ComputeSpecError(
                f"volume {self.name!r} access_mode must be one of {', '.join(_ACCESS_MODES)}; got {self.access_mode!r}")

    @classmethod
    def from_name(cls, name: str, mount_path: str | None = None) -> Volume:
        """An existing PersistentVolumeClaim."""
        return cls(name=name, mount_path=mount_path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)


@dataclass(frozen=True)
class LoggingConfig:
    """How logs stream back to the notebook (the seed's options)."""

    stream_logs: bool = True
    level: str = "info"
    include_system_logs: bool = False
    include_events: bool = True
    grace_period: float = 2.0
    include_name: bool = True
    poll_timeout: float = 1.0
    shutdown_grace_period: float = 0.0

    def __post_init__(self) -> None:
        for name in ("stream_logs", "include_system_logs", "include_events", "include_name"):
            object.__setattr__(self, name, check_bool(getattr(self, name), f"logging_config.{name}"))
        if not isinstance(self.level, str) or self.level.lower() not in _LOG_LEVELS:
            raise ComputeSpecError(f"logging_config.level must be one of {', '.join(_LOG_LEVELS)}; got {self.level!r}")
        object.__setattr__(self, "level", self.level.lower())
        for name in ("grace_period", "poll_timeout", "shutdown_grace_period"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ComputeSpecError(f"logging_config.{name} must be seconds >= 0, e.g. 2.0; got {v!r}")
            object.__setattr__(self, name, float(v))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)


def _build(cls: type, value: Any, param: str, example: str) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as exc:
            raise ComputeSpecError(f"{param}: {exc}; e.g. {example}") from None
    raise ComputeSpecError(f"{param} must be a {cls.__name__}, a name or a dict; got {value!r}; e.g. {example}")


def as_secrets(value: object) -> list[Secret]:
    """Secrets from names, Secret objects or their dicts (a comma-separated string of names too)."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value or []
    if not isinstance(items, (list, tuple)):
        raise ComputeSpecError(f"secrets must be a list like ['my-secret', Secret.from_provider('aws')]; got {value!r}")
    out = [Secret(name=v) if isinstance(v, str) else _build(Secret, v, "secrets", "Secret.from_name('creds')")
           for v in items]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ComputeSpecError(f"secrets: {min(n for n in names if names.count(n) > 1)!r} is listed twice")
    return out


def as_volumes(value: object) -> list[Volume]:
    """Volumes from PVC names, Volume objects or their dicts (a comma-separated string of names too)."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value or []
    if not isinstance(items, (list, tuple)):
        raise ComputeSpecError(f"volumes must be a list like ['my-pvc', Volume('data', size='10Gi')]; got {value!r}")
    out = [Volume(name=v) if isinstance(v, str) else _build(Volume, v, "volumes", "Volume('data', size='10Gi')")
           for v in items]
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ComputeSpecError(f"volumes: {min(n for n in names if names.count(n) > 1)!r} is listed twice")
    return out


def as_logging_config(value: object) -> LoggingConfig:
    """A LoggingConfig from one, from its dict, or the defaults for None."""
    return LoggingConfig() if value is None else _build(LoggingConfig, value, "logging_config",
                                                         "LoggingConfig(level='debug')")


# ---------------------------------------------------------------------- namespace resolution

def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ComputeSpecError(f"cannot read {path} as YAML ({exc}); fix or remove the file") from None


def _kubeconfig_namespace(paths: list[Path]) -> tuple[str | None, Path | None]:
    """The current context's namespace, merging files as kubectl does (the first setting wins)."""
    current, contexts = None, {}
    for path in paths:
        if not path.is_file():
            continue
        data = _read_yaml(path) or {}
        if not isinstance(data, dict):
            continue
        current = current or data.get("current-context")
        for item in data.get("contexts") or []:
            if isinstance(item, dict) and item.get("name") not in contexts:
                contexts[item.get("name")] = (item.get("context") or {}, path)
    if current in contexts:
        ctx, path = contexts[current]
        return (ctx.get("namespace") if isinstance(ctx, dict) else None), path
    return None, None


def resolve_namespace(explicit: str | None = None, *, kubeconfig_path: str | None = None,
                      environ: Mapping[str, str] | None = None,
                      service_account_path: str | Path | None = None) -> tuple[str, str]:
    """``(namespace, where it came from)``, in the seed's order.

    Explicit -> ``KT_NAMESPACE`` -> ``namespace:`` in ``$KT_HOME/config.yaml``
    (``~/.kt``) -> the kubeconfig's current context (``kubeconfig_path``, else
    ``$KUBECONFIG``, else ``~/.kube/config``) -> the in-cluster service account
    file -> ``"default"``. ``environ`` and ``service_account_path`` default to
    the real ones; tests point them elsewhere.
    """
    env = os.environ if environ is None else environ
    if explicit:
        return check_dns_label(explicit, "namespace"), "explicit"
    if env.get("KT_NAMESPACE"):
        return check_dns_label(env["KT_NAMESPACE"], "KT_NAMESPACE (environment variable)"), "KT_NAMESPACE"
    home = Path(env.get("HOME") or Path.home())
    config = Path(env.get("KT_HOME") or home / ".kt") / "config.yaml"
    if config.is_file():
        data = _read_yaml(config)
        if isinstance(data, dict) and data.get("namespace"):
            return check_dns_label(data["namespace"], f"namespace in {config}"), str(config)
    if kubeconfig_path:
        paths = [Path(os.path.expanduser(kubeconfig_path))]
    elif env.get("KUBECONFIG"):
        paths = [Path(os.path.expanduser(p)) for p in env["KUBECONFIG"].split(os.pathsep) if p]
    else:
        paths = [home / ".kube" / "config"]
    ns, path = _kubeconfig_namespace(paths)
    if ns:
        return check_dns_label(ns, f"namespace of the current context in {path}"), str(path)
    sa = Path(service_account_path) if service_account_path is not None else SERVICE_ACCOUNT_NAMESPACE_PATH
    if sa.is_file():
        ns = sa.read_text().strip()
        if ns:
            return check_dns_label(ns, f"namespace in {sa}"), str(sa)
    return "default", "default"
