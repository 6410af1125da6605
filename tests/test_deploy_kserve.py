"""The KServe manifests (deploy/kserve/): what they ask of the image agrees with the image and the
compose file, and their structure is what KServe's and Kubernetes' API types accept.

The schema test needs the ``kserve`` SDK (its generated ``V1beta1*`` model classes and the
``kubernetes`` client's ``V1*`` ones), which pins versions the service's environment does not
share; CI runs it in a virtual environment of its own (.ci/run), where the other tests' imports
are absent, so this module imports nothing of the project at its top.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KSERVE = ROOT / "deploy" / "kserve"
MANIFESTS = {
    "inferenceservice.yaml": ("serving.kserve.io/v1beta1", "InferenceService", "V1beta1InferenceService"),
    "worker.yaml": ("apps/v1", "Deployment", "V1Deployment"),
    "model-store.yaml": ("v1", "PersistentVolumeClaim", "V1PersistentVolumeClaim"),
}
PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "object": (str, int, float, bool, dict, list),  # IntOrString and free-form fields
    "datetime": (str,),
    "date": (str,),
    "ResourceQuantity": (str, int, float),
}


def load(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((KSERVE / name).read_text()))


def predictor() -> dict[str, Any]:
    return dict(load("inferenceservice.yaml")["spec"]["predictor"])


def worker_pod() -> dict[str, Any]:
    return dict(load("worker.yaml")["spec"]["template"]["spec"])


# --- the structure, against the API types of the kserve SDK -----------------------------------
def _model_class(name: str) -> type:
    import kserve.models  # only where the SDK is installed
    import kubernetes.client.models

    for module in (kserve.models, kubernetes.client.models):
        cls = getattr(module, name, None)
        if cls is not None:
            return cls  # type: ignore[no-any-return]
    raise AssertionError(f"no API type {name}")


def structure_errors(value: Any, type_name: str, path: str) -> list[str]:
    """Every place where ``value`` is not of the generated API type ``type_name``: unknown fields
    (the generated classes would drop them silently), wrong kinds of values, and what the
    generated constructors refuse (missing required fields, values outside an enumeration); empty
    when the manifest is one the API accepts."""
    errors: list[str] = []
    _build(value, type_name, path, errors)
    return errors


def _build(value: Any, type_name: str, path: str, errors: list[str]) -> Any:
    """``value`` as an instance of ``type_name``, built bottom-up; problems go to ``errors``."""
    if (m := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name)) is not None:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list ({type_name})")
            return None
        return [_build(v, m.group(1), f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if (m := re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", type_name)) is not None:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping ({type_name})")
            return None
        inner = m.group(1) or m.group(2)
        return {k: _build(v, inner, f"{path}.{k}", errors) for k, v in value.items()}
    if type_name in PRIMITIVES:
        if not isinstance(value, PRIMITIVES[type_name]) or (type_name == "int" and isinstance(value, bool)):
            errors.append(f"{path}: {value!r} is not {type_name}")
        return value
    cls = _model_class(type_name)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({type_name})")
        return None
    by_key = {key: attr for attr, key in cls.attribute_map.items()}  # type: ignore[attr-defined]
    kwargs = {}
    for key, v in value.items():
        if key not in by_key:
            errors.append(f"{path}.{key}: no such field in {type_name}")
            continue
        attr = by_key[key]
        kwargs[attr] = _build(v, cls.openapi_types[attr], f"{path}.{key}", errors)  # type: ignore[attr-defined]
    try:  # the generated constructor checks required fields and enumerations
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        errors.append(f"{path}: {type_name} refuses it: {exc}")
        return None


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_kserve_schema_each_manifest_is_a_valid_api_object(name):
    pytest.importorskip("kserve", reason="the kserve SDK runs in its own environment (.ci/run)")
    api_version, kind, type_name = MANIFESTS[name]
    manifest = load(name)
    assert (manifest["apiVersion"], manifest["kind"]) == (api_version, kind)
    assert structure_errors(manifest, type_name, name) == []


def test_kserve_schema_catches_a_misspelt_field_and_a_wrong_type():
    """The check fails where the API would refuse or silently drop a field."""
    pytest.importorskip("kserve", reason="the kserve SDK runs in its own environment (.ci/run)")
    broken = load("inferenceservice.yaml")
    broken["spec"]["predictor"]["minReplica"] = 2
    broken["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    errors = structure_errors(broken, "V1beta1InferenceService", "isvc")
    assert any("minReplica: no such field" in e for e in errors), errors
    assert any("containerPort: '8000' is not int" in e for e in errors), errors
    no_name = load("worker.yaml")
    del no_name["spec"]["template"]["spec"]["containers"][0]["name"]
    assert structure_errors(no_name, "V1Deployment", "worker"), "a container without a name passed"


# --- what the manifests ask of the image and the service ----------------------------------------
def test_predictor_runs_the_service_image_as_compose_does():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    container = predictor()["containers"][0]
    assert container["name"] == "kserve-container"  # KServe's name for a custom predictor's container
    assert container["image"].split(":")[0] == compose["api"]["image"].split(":")[0] == "cama-serve"
    assert container["command"] == compose["api"]["command"]
    worker = worker_pod()["containers"][0]
    assert worker["image"] == container["image"]
    assert worker["command"] == compose["worker"]["command"]
    assert [p["containerPort"] for p in container["ports"]] == [8000]
    assert "CAMA_PORT=8000" in (ROOT / "Dockerfile").read_text()  # the image's port


def test_replicas_and_workers_share_the_store_and_the_secrets():
    claim = load("model-store.yaml")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts it
    for pod, container in (
        (predictor(), predictor()["containers"][0]),
        (worker_pod(), worker_pod()["containers"][0]),
    ):
        (volume,) = pod["volumes"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/srv/model_store"}]
        env = {e["name"]: e for e in container["env"]}
        assert env["CAMA_MODEL_STORE"]["value"] == "/srv/model_store"
        assert env["CAMA_ENVIRONMENT"]["value"] == "production"  # the settings then demand a strong token
        for name in ("CAMA_TOKEN", "CAMA_REDIS_URL"):  # secrets come from a Secret, never inline
            assert "value" not in env[name]
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "cama-secrets"
    assert predictor()["minReplicas"] >= 2


def test_environment_names_are_settings_and_probes_are_routes():
    from app.core.config import Settings  # the service's environment only
    from app.main import create_app

    fields = set(Settings.model_fields)
    for container in (predictor()["containers"][0], worker_pod()["containers"][0]):
        for entry in container["env"]:
            name = entry["name"]
            assert name.startswith("CAMA_"), name
            assert name[5:].lower() in fields, name
    routes = set(create_app().openapi()["paths"])
    container = predictor()["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes, probe
        assert container[probe]["httpGet"]["port"] == 8000
