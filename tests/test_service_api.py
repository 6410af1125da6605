"""The HTTP API of a real ``python -m app`` process: happy paths, every bad input as a 4xx, auth, metrics."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.inputs import digit_like_images, png_base64
from harness.processes import ServiceProcess
from harness.stores import clone_store, template_store

TOKEN = "t" * 24
MAX_INPUTS = 8
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    seed_dir, template = template_store(tmp_path_factory.getbasetemp() / "tiny_template")
    root = tmp_path_factory.mktemp("api")
    store = clone_store(template, root / "store")
    svc = ServiceProcess(
        root / "api.log",
        model_store=str(store),
        seed_dir=str(seed_dir),
        models=["tiny"],
        token=TOKEN,
        max_inputs=MAX_INPUTS,
        max_body_bytes=MAX_BODY,
        max_k=50,
        batch_max_wait_ms=20,
    )
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service.url, timeout=30) as c:
        yield c


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    x, _ = digit_like_images(n, seed=seed)
    return [img / 255.0 for img in x]


def reason(response: httpx.Response) -> str:
    return str(response.json()["detail"]["reason"])


def test_health_and_openapi(client):
    assert client.get("/livez").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == {"tiny": 1}
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    # a multipart field the endpoint does not take is a 422 unknown_field, so the schema says so
    assert body["multipart/form-data"]["schema"]["additionalProperties"] is False
    assert "PredictRequest" in spec["components"]["schemas"]
    # the schema says what the server checks: exactly one input form, never null
    predict_schema = spec["components"]["schemas"]["PredictRequest"]
    assert predict_schema["oneOf"] == [{"required": [f]} for f in ("images", "records", "rows")]
    assert "null" not in json.dumps(predict_schema["properties"]["images"])
    assert "AdaptRequest" in spec["components"]["schemas"]
    for path in (
        "/adapt",
        "/jobs/{job_id}",
        "/models",
        "/models/{name}",
        "/models/{name}/activate",
        "/metrics",
    ):
        assert path in spec["paths"]


def test_predict_json_arrays_base64_and_multipart_agree(client):
    imgs = images(3)
    as_arrays = client.post(
        "/predict", json={"model": "tiny", "images": [i.tolist() for i in imgs], "seed": 5, "k": 4}
    )
    assert as_arrays.status_code == 200
    body = as_arrays.json()
    assert body["model"] == "tiny"
    assert body["version"] == 1
    assert body["k"] == 4
    assert body["seed"] == 5
    assert len(body["predictions"]) == 3
    for p in body["predictions"]:
        assert len(p["probabilities"]) == 10
        assert abs(sum(p["probabilities"]) - 1) < 1e-4
        assert p["label"] == int(np.argmax(p["probabilities"]))
    as_png = client.post(
        "/predict", json={"model": "tiny", "images": [png_base64(i) for i in imgs], "seed": 5, "k": 4}
    )
    files = []
    for i, img in enumerate(imgs):
        buf = io.BytesIO()
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(buf, format="PNG")
        files.append(("images", (f"{i}.png", buf.getvalue(), "image/png")))
    as_upload = client.post("/predict", data={"model": "tiny", "seed": "5", "k": "4"}, files=files)
    assert as_upload.status_code == 200
    # uint8 PNG round trip: exactly the same inputs, same noise -> same answer
    assert as_png.json()["predictions"] == as_upload.json()["predictions"]
    assert [p["label"] for p in as_png.json()["predictions"]] == [p["label"] for p in body["predictions"]]


def test_same_seed_same_answer_and_default_seed_is_reported(client):
    payload = {"model": "tiny", "images": [png_base64(images(1)[0])], "seed": 123}
    first, second = (client.post("/predict", json=payload).json() for _ in range(2))
    assert first["predictions"] == second["predictions"]
    unseeded = client.post("/predict", json={"model": "tiny", "images": payload["images"]}).json()
    assert isinstance(unseeded["seed"], int)
    assert unseeded["k"] == 10


def test_concurrent_single_image_requests_are_micro_batched(client, service):
    payload = {"model": "tiny", "images": [png_base64(images(1)[0])], "seed": 1}

    def one(_):
        with httpx.Client(base_url=service.url, timeout=30) as c:
            return c.post("/predict", json=payload)

    before = _metric(client, "cama_batch_inputs_count", 'model="tiny"')
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(48)))
    assert all(r.status_code == 200 for r in responses)
    assert (
        len({json.dumps(r.json()["predictions"]) for r in responses}) == 1
    )  # batching never changes an answer
    passes = _metric(client, "cama_batch_inputs_count", 'model="tiny"') - before
    assert passes < 48  # some requests shared a forward pass


def _metric(client: httpx.Client, name: str, label: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


GOOD = [[0.0] * 28] * 28


@pytest.mark.parametrize(
    ("payload", "status", "why"),
    [
        ({"model": "nope", "images": [GOOD]}, 404, "unknown_model"),
        ({"model": "tiny", "images": [[[0.0] * 27] * 28]}, 422, "bad_shape"),
        ({"model": "tiny", "images": [[[0.0] * 28] * 3]}, 422, "bad_shape"),
        ({"model": "tiny", "images": ["%%%not-base64"]}, 422, "undecodable_image"),
        ({"model": "tiny", "images": ["aGVsbG8gd29ybGQh"]}, 422, "undecodable_image"),
        ({"model": "tiny", "images": [[[2.0] * 28] * 28]}, 422, "out_of_range"),
        ({"model": "tiny", "images": []}, 422, "no_inputs"),
        ({"model": "tiny", "images": [GOOD] * (MAX_INPUTS + 1)}, 413, "too_many_inputs"),
        ({"model": "tiny", "records": [{"a": [1.0], "c": [1.0], "x": [1.0]}]}, 422, "wrong_input_kind"),
        ({"model": "tiny", "images": [GOOD], "records": []}, 422, "invalid_request"),
        ({"model": "tiny"}, 422, "invalid_request"),
        ({"model": "tiny", "images": [GOOD], "records": None}, 422, "invalid_request"),
        ({"images": [GOOD]}, 422, "invalid_request"),
        ({"model": "tiny", "images": [GOOD], "k": 0}, 422, "invalid_request"),
        ({"model": "tiny", "images": [GOOD], "k": 51}, 422, "k_too_large"),
        ({"model": "tiny", "images": [GOOD], "seed": -1}, 422, "invalid_request"),
        ({"model": "tiny", "images": [GOOD], "extra": 1}, 422, "invalid_request"),
        ({"model": "tiny", "images": [[["a"] * 28] * 28]}, 422, "invalid_request"),
        ({"model": "tiny", "images": [[[True] * 28] * 28]}, 422, "invalid_request"),
        ({"model": "tiny", "images": [GOOD], "k": True}, 422, "invalid_request"),
        ({"model": "tiny", "images": [GOOD], "k": "3"}, 422, "invalid_request"),
        ({"model": "tiny", "images": [GOOD], "seed": "1"}, 422, "invalid_request"),
    ],
)
def test_bad_inputs_are_4xx_with_a_reason(client, payload, status, why):
    r = client.post("/predict", json=payload)
    assert (r.status_code, reason(r)) == (status, why), r.text


@pytest.mark.parametrize(
    ("content", "content_type", "status", "why"),
    [
        (b"{not json", "application/json", 422, "invalid_request"),
        (b"[1, 2]", "application/json", 422, "invalid_request"),
        (b"", "application/json", 422, "invalid_request"),
        (b"model=tiny", "text/plain", 415, "unsupported_media_type"),
        (
            b'{"model": "tiny", "images": [['
            + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28)
            + b"]]}",
            "application/json",
            422,
            "invalid_request",  # NaN and Infinity are not JSON
        ),
        (
            b'{"model": "tiny", "images": [['
            + b",".join([b"[" + b",".join([b"1e400"] * 28) + b"]"] * 28)
            + b"]]}",
            "application/json",
            422,
            "invalid_request",  # overflows a float: refused while the body streams in
        ),
    ],
)
def test_bad_bodies_are_4xx_with_a_reason(client, content, content_type, status, why):
    r = client.post("/predict", content=content, headers={"content-type": content_type})
    assert (r.status_code, reason(r)) == (status, why), r.text


def test_oversized_bodies_are_refused(client):
    big = {"model": "tiny", "images": ["A" * (MAX_BODY + 10)]}
    r = client.post("/predict", json=big)
    assert (r.status_code, reason(r)) == (413, "body_too_large")

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(100):
            yield b" " * 4096

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert (r.status_code, reason(r)) == (413, "body_too_large")


def test_bad_uploads(client):
    r = client.post(
        "/predict", data={"model": "tiny"}, files=[("images", ("x.png", b"garbage", "image/png"))]
    )
    assert (r.status_code, reason(r)) == (422, "undecodable_image")
    r = client.post("/predict", data={"model": "tiny"}, files=[("other", ("x.png", b"garbage", "image/png"))])
    assert (r.status_code, reason(r)) == (422, "unknown_field")
    many = [("images", (f"{i}.png", b"x", "image/png")) for i in range(MAX_INPUTS + 1)]
    r = client.post("/predict", data={"model": "tiny"}, files=many)
    assert (r.status_code, reason(r)) == (413, "too_many_inputs")
    r = client.post("/predict", data={"model": "nope"}, files=[("images", ("x.png", b"x", "image/png"))])
    assert (r.status_code, reason(r)) == (404, "unknown_model")
    r = client.post(
        "/predict", data={"model": "tiny", "k": "abc"}, files=[("images", ("x.png", _png(), "image/png"))]
    )
    assert (r.status_code, reason(r)) == (422, "invalid_request")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="PNG")
    return buf.getvalue()


def test_routing_errors_are_json(client):
    r = client.get("/predict")
    assert (r.status_code, reason(r)) == (405, "method_not_allowed")
    r = client.get("/nowhere")
    assert (r.status_code, reason(r)) == (404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/adapt", {"model": "tiny", "images": [GOOD] * 20}),
        ("GET", "/jobs/" + "0" * 32, None),
        ("POST", "/jobs/" + "0" * 32 + "/cancel", None),
        ("POST", "/models/tiny/activate", {"version": 1}),
    ],
)
def test_management_endpoints_need_the_token(client, method, path, body):
    r = client.request(method, path, json=body)
    assert (r.status_code, reason(r)) == (401, "missing_token")
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.request(method, path, json=body, headers={"Authorization": "Bearer wrong-token"})
    assert (r.status_code, reason(r)) == (403, "invalid_token")
    r = client.request(method, path, json=body, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401


def test_jobs_and_models_errors(client):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.get("/jobs/" + "0" * 32, headers=auth)
    assert (r.status_code, reason(r)) == (404, "unknown_job")
    r = client.get("/jobs/not-an-id", headers=auth)
    assert (r.status_code, reason(r)) == (422, "invalid_request")
    r = client.post("/adapt", json={"model": "tiny", "images": [GOOD] * 3}, headers=auth)
    assert (r.status_code, reason(r)) == (422, "too_few_inputs")
    # bad values, an unknown option
    for bad in ({"lr_schedule": "linear"}, {"decay_fraction": 0}, {"average": "tail"}):
        body = {"model": "tiny", "images": [GOOD] * 20, "finetune": bad}
        r = client.post("/adapt", json=body, headers=auth)
        assert (r.status_code, reason(r)) == (422, "invalid_request"), bad
    r = client.post("/models/tiny/activate", json={"version": 9}, headers=auth)
    assert (r.status_code, reason(r)) == (404, "unknown_version")
    r = client.get("/models/nope")
    assert (r.status_code, reason(r)) == (404, "unknown_model")


def test_models_and_lineage(client):
    listing = client.get("/models").json()
    assert listing == [
        {"name": "tiny", "kind": "image", "active_version": 1, "served_version": 1, "versions": [1]}
    ]
    detail = client.get("/models/tiny").json()
    assert detail["inputs"] == {"x": [1, 28, 28]}
    (v1,) = detail["lineage"]
    assert v1["version"] == 1
    assert v1["parent"] is None
    assert set(v1["files"]) == {"checkpoint.pt", "model.onnx", "classes.onnx", "replay.npz"}


def test_metrics_exposition(client):
    client.post("/predict", json={"model": "tiny", "images": [GOOD]})
    text = client.get("/metrics").text
    assert 'cama_requests_total{method="POST",model="tiny",route="/predict",status="200"}' in text
    assert (
        'cama_request_duration_seconds_bucket{le="0.1",method="POST",model="tiny",route="/predict"}' in text
    )
    assert "cama_requests_in_flight" in text
    assert 'cama_batch_inputs_bucket{le="1.0",model="tiny"}' in text
    assert 'cama_active_version{model="tiny"} 1.0' in text
    assert "cama_adapt_jobs" in text
    assert 'model="nope"' not in text  # unknown names never become label values
