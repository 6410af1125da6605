"""The Open Inference Protocol (KServe v2) of a real ``python -m app`` process, called with
``tritonclient``: health, metadata, inference agreeing with ``/predict``, every error as a 4xx."""

from __future__ import annotations

import base64
import io
import json
import struct
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from harness.inputs import digit_like_images
from harness.processes import ServiceProcess
from harness.stores import build_store, make_measurement_seed_dir, make_seed_dir

TOKEN = "v" * 24
MAX_INPUTS = 8
MAX_BODY = 200_000
MAX_K = 50
MAX_WORK = 2000  # 8 inputs x k = 50 x 10 classes is too much


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    seed_dir = make_seed_dir(root / "seed", "tiny")
    make_measurement_seed_dir(seed_dir, "meas")
    store = build_store(root / "store", seed_dir, ["tiny", "meas"]).root
    svc = ServiceProcess(
        root / "api.log",
        model_store=str(store),
        seed_dir=str(seed_dir),
        models=["tiny", "meas"],
        token=TOKEN,
        max_inputs=MAX_INPUTS,
        max_body_bytes=MAX_BODY,
        max_k=MAX_K,
        max_work=MAX_WORK,
        batch_max_wait_ms=20,
    )
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def client(service):
    c = triton.InferenceServerClient(service.url.removeprefix("http://"))
    yield c
    c.close()


@pytest.fixture
def http(service):
    with httpx.Client(base_url=service.url, timeout=30) as c:
        yield c


def images(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 1, 28, 28)`` float32 in [0, 1] whose PNG round trip is exact."""
    x, _ = digit_like_images(n, seed=seed)
    return (x[:, None] / 255.0).astype(np.float32)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(image[0] * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def tensor(name: str, data: np.ndarray, datatype: str, *, binary: bool = True) -> triton.InferInput:
    t = triton.InferInput(name, list(data.shape), datatype)
    t.set_data_from_numpy(data, binary_data=binary)
    return t


def records(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 10)).astype(np.float32),
        "a": rng.standard_normal((n, 5)).astype(np.float32),
        "c": rng.standard_normal((n, 5)).astype(np.float32),
    }


def native(http: httpx.Client, body: dict[str, object]) -> dict[str, np.ndarray]:
    """``/predict``'s answer as arrays (its probabilities are rounded to 6 decimals, log p(x) to 4)."""
    r = http.post("/predict", json=body)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    unusual = [p["unusual"] for p in preds]
    return {
        "probabilities": np.array([p["probabilities"] for p in preds]),
        "label": np.array([p["label"] for p in preds]),
        "log_px": np.array([p["log_px"] for p in preds]),
        "unusual": None if unusual[0] is None else np.array(unusual),
    }


def assert_agree(result: triton.InferResult, expected: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], atol=2e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
    np.testing.assert_allclose(result.as_numpy("log_px"), expected["log_px"], atol=1e-4, rtol=1e-6)
    if expected["unusual"] is None:
        assert result.as_numpy("unusual") is None
    else:
        np.testing.assert_allclose(result.as_numpy("unusual"), expected["unusual"], atol=1e-4)


def test_server_live_ready_and_metadata(client, http):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata() == {
        "name": "cama-serve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata_and_readiness(client):
    outputs = [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "log_px", "datatype": "FP32", "shape": [-1]},
        {"name": "unusual", "datatype": "FP32", "shape": [-1]},
    ]
    tiny = client.get_model_metadata("tiny")
    assert tiny == {
        "name": "tiny",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": outputs,
    }
    assert client.get_model_metadata("tiny", "1") == tiny
    meas = client.get_model_metadata("meas")
    assert meas["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "a", "datatype": "FP32", "shape": [-1, 5]},
        {"name": "c", "datatype": "FP32", "shape": [-1, 5]},
    ]
    assert meas["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]}
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("tiny", "2")
    assert not client.is_model_ready("nope")
    for name, version in (("nope", ""), ("tiny", "2"), ("tiny", "01")):
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata(name, version)
        assert err.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_infer_agrees_with_predict(client, http, binary):
    x = images(3)
    expected = native(http, {"model": "tiny", "images": [i.tolist() for i in x], "k": 4, "seed": 5})
    outputs = (
        None
        if binary
        else [triton.InferRequestedOutput(n, binary_data=False) for n in ("probabilities", "label", "log_px")]
    )
    inputs = [tensor("x", x, "FP32", binary=binary)]
    result = client.infer("tiny", inputs, outputs=outputs, request_id="req-7", parameters={"k": 4, "seed": 5})
    response = result.get_response()
    assert response["model_name"] == "tiny"
    assert response["model_version"] == "1"
    assert response["id"] == "req-7"
    assert response["parameters"] == {"k": 4, "seed": 5}
    assert_agree(result, expected)  # unusual: not at k = 4, as /predict
    # the versioned path answers the same; the nested JSON form is the same tensor
    versioned = client.infer(
        "tiny", [tensor("x", x, "FP32")], model_version="1", parameters={"k": 4, "seed": 5}
    )
    assert_agree(versioned, expected)
    nested = {
        "inputs": [{"name": "x", "shape": [3, 1, 28, 28], "datatype": "FP32", "data": x.tolist()}],
        "parameters": {"k": 4, "seed": 5},
    }
    r = http.post("/v2/models/tiny/infer", json=nested)
    assert r.status_code == 200, r.text
    out = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    np.testing.assert_allclose(out["probabilities"], expected["probabilities"], atol=2e-6)


def test_default_k_gives_unusual_as_predict(client, http):
    x = images(4, seed=1)
    expected = native(http, {"model": "tiny", "images": [i.tolist() for i in x], "seed": 11})
    assert expected["unusual"] is not None
    result = client.infer("tiny", [tensor("x", x, "FP32")], parameters={"seed": 11})
    assert result.get_response()["parameters"] == {"k": 10, "seed": 11}
    assert_agree(result, expected)
    unseeded = client.infer("tiny", [tensor("x", x, "FP32")]).get_response()["parameters"]
    assert isinstance(unseeded["seed"], int)


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_infer_agrees_with_predict(client, http, binary):
    x = images(3, seed=2)
    files = [png(i) for i in x]
    encoded = [base64.b64encode(f).decode() for f in files]
    expected = native(http, {"model": "tiny", "images": encoded, "k": 3, "seed": 9})
    # binary: the files themselves; JSON: their base64 text (JSON strings carry no raw bytes)
    items = files if binary else [e.encode() for e in encoded]
    data = np.array(items, dtype=np.object_)
    result = client.infer("tiny", [tensor("x", data, "BYTES", binary=binary)], parameters={"k": 3, "seed": 9})
    assert_agree(result, expected)


def test_measurement_infer_agrees_with_predict(client, http):
    rec = records(4)
    body = {
        "model": "meas",
        "records": [{k: rec[k][i].tolist() for k in "acx"} for i in range(4)],
        "k": 6,
        "seed": 3,
    }
    expected = native(http, body)
    inputs = [tensor(name, rec[name], "FP32") for name in ("c", "x", "a")]  # any order
    result = client.infer("meas", inputs, parameters={"k": 6, "seed": 3})
    assert result.as_numpy("probabilities").shape == (4, 5)
    assert_agree(result, expected)


def test_requested_outputs_only_in_the_asked_form(client):
    x = images(2)
    outputs = [triton.InferRequestedOutput("label", binary_data=False), triton.InferRequestedOutput("log_px")]
    result = client.infer("tiny", [tensor("x", x, "FP32")], outputs=outputs, parameters={"seed": 1})
    label, log_px = result.get_response()["outputs"]
    assert label["name"] == "label"
    assert len(label["data"]) == 2
    assert "parameters" not in label  # JSON, as asked
    assert log_px["parameters"] == {"binary_data_size": 8}
    assert result.as_numpy("probabilities") is None
    assert result.as_numpy("log_px").dtype == np.float32


TWO = images(2)


def fp32(x: np.ndarray = TWO, name: str = "x") -> list[triton.InferInput]:
    return [tensor(name, x, "FP32")]


def raw_bytes(*items: bytes) -> list[triton.InferInput]:
    return [tensor("x", np.array(items, dtype=np.object_), "BYTES")]


def base64_json(*items: str) -> list[triton.InferInput]:
    return [tensor("x", np.array([i.encode() for i in items], dtype=np.object_), "BYTES", binary=False)]


ERRORS = [
    # (model, version, inputs, outputs, parameters, status)
    ("nope", "", fp32(), None, None, "404"),
    ("tiny", "2", fp32(), None, None, "404"),
    ("tiny", "", [tensor("x", TWO.astype(np.float64), "FP64")], None, None, "422"),
    ("tiny", "", [tensor("x", (TWO * 255).astype(np.uint8), "UINT8")], None, None, "422"),
    ("tiny", "", fp32(np.zeros((2, 1, 27, 28), np.float32)), None, None, "422"),
    ("tiny", "", fp32(np.zeros((2, 28, 28), np.float32)), None, None, "422"),
    ("tiny", "", fp32(name="images"), None, None, "422"),
    ("tiny", "", fp32(images(MAX_INPUTS + 1)), None, None, "413"),
    ("tiny", "", fp32(np.zeros((0, 1, 28, 28), np.float32)), None, None, "422"),
    ("tiny", "", fp32(TWO * 2), None, None, "422"),
    ("tiny", "", fp32(np.full((2, 1, 28, 28), np.nan, np.float32)), None, None, "422"),
    ("tiny", "", raw_bytes(b"garbage", b"garbage"), None, None, "422"),
    ("tiny", "", raw_bytes(png(np.zeros((1, 20, 20), np.float32))), None, None, "422"),  # 20 x 20
    ("tiny", "", base64_json("%%%not-base64"), None, None, "422"),
    ("tiny", "", base64_json("aGVsbG8gd29ybGQh"), None, None, "422"),
    ("tiny", "", fp32(), None, {"k": 0}, "422"),
    ("tiny", "", fp32(), None, {"k": MAX_K + 1}, "422"),
    ("tiny", "", fp32(), None, {"k": True}, "422"),
    ("tiny", "", fp32(), None, {"k": "3"}, "422"),
    ("tiny", "", fp32(), None, {"seed": -1}, "422"),
    ("tiny", "", fp32(), None, {"temperature": 1}, "422"),
    ("tiny", "", fp32(images(MAX_INPUTS)), None, {"k": MAX_K}, "413"),
    ("tiny", "", fp32(), [triton.InferRequestedOutput("logits")], None, "422"),
    ("tiny", "", fp32(), [triton.InferRequestedOutput("unusual")], {"k": 3}, "422"),
    ("tiny", "", fp32(), [triton.InferRequestedOutput("label", class_count=2)], None, "422"),
    ("meas", "", fp32(), None, None, "422"),
    ("meas", "", [tensor(n, v[:, :3], "FP32") for n, v in records(2).items()], None, None, "422"),
]


@pytest.mark.parametrize(("model", "version", "inputs", "outputs", "parameters", "status"), ERRORS)
def test_errors_through_tritonclient(client, model, version, inputs, outputs, parameters, status):
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, inputs, model_version=version, outputs=outputs, parameters=parameters)
    assert err.value.status() == status, err.value.message()
    assert err.value.message()  # the protocol's "error" text


GOOD = {"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}


@pytest.mark.parametrize(
    ("body", "status", "why"),
    [
        ({"inputs": [GOOD]}, 200, None),
        ({"inputs": []}, 422, "invalid_request"),
        ({"inputs": [GOOD], "extra": 1}, 422, "invalid_request"),
        ({"inputs": [GOOD, GOOD]}, 422, "wrong_input_kind"),
        ({"inputs": [{**GOOD, "data": [0.0] * 783}]}, 422, "bad_shape"),
        ({"inputs": [{**GOOD, "data": [[0.0] * 28] * 28}]}, 422, "bad_shape"),  # nested, not as the shape
        ({"inputs": [{**GOOD, "data": ["0"] * 784}]}, 422, "invalid_request"),
        ({"inputs": [{**GOOD, "data": [True] * 784}]}, 422, "invalid_request"),
        ({"inputs": [{**GOOD, "data": None}]}, 422, "invalid_request"),
        ({"inputs": [{**GOOD, "shape": [1, 1, 28, -28]}]}, 422, "invalid_request"),
        ({"inputs": [{**GOOD, "datatype": "BOOL"}]}, 422, "bad_datatype"),
        ({"inputs": [GOOD], "parameters": {"k": 2.5}}, 422, "invalid_request"),
        ({"inputs": [GOOD], "outputs": [{"name": "label"}, {"name": "label"}]}, 422, "invalid_request"),
        ({"inputs": [{**GOOD, "shape": [MAX_INPUTS + 1, 1, 28, 28]}]}, 413, "too_many_inputs"),
    ],
)
def test_json_bodies_answer_with_the_protocols_error(http, body, status, why):
    r = http.post("/v2/models/tiny/infer", json=body)
    assert r.status_code == status, r.text
    if why is not None:
        assert r.json() == {"error": r.json()["error"], "reason": why}


def binary_body(header: dict[str, object], data: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + data, {
        "Inference-Header-Content-Length": str(len(text)),
        "content-type": "application/octet-stream",
    }


def test_framing_media_and_size_errors(http):
    one = {
        "inputs": [
            {
                "name": "x",
                "shape": [1, 1, 28, 28],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 3136},
            }
        ]
    }
    zeros = np.zeros(784, "<f4").tobytes()
    content, headers = binary_body(one, zeros)
    assert http.post("/v2/models/tiny/infer", content=content, headers=headers).status_code == 200
    cases = [
        (binary_body(one, zeros[:-4]), 422, "invalid_request"),  # shorter than binary_data_size
        (binary_body(one, zeros + b"\0"), 422, "invalid_request"),  # bytes belonging to no input
        ((content, {**headers, "Inference-Header-Content-Length": "99999999"}), 422, "invalid_request"),
        ((content, {**headers, "Inference-Header-Content-Length": "-1"}), 422, "invalid_request"),
        ((content, {**headers, "Inference-Header-Content-Length": "7"}), 422, "invalid_request"),
        ((b"{not json", {"content-type": "application/json"}), 422, "invalid_request"),
        ((b"", {"content-type": "application/json"}), 422, "invalid_request"),
        ((content, {**headers, "content-type": "text/plain"}), 415, "unsupported_media_type"),
        ((content, {**headers, "content-encoding": "gzip"}), 415, "unsupported_media_type"),
        ((b" " * (MAX_BODY + 1), {"content-type": "application/json"}), 413, "body_too_large"),
    ]
    bytes_one = {
        "inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]
    }
    cases.append((binary_body(bytes_one, struct.pack("<I", 100) + b"abcd"), 422, "invalid_request"))
    for (body, hdrs), status, why in cases:
        r = http.post("/v2/models/tiny/infer", content=body, headers=hdrs)
        assert (r.status_code, r.json().get("reason")) == (status, why), (hdrs, r.text)
        assert isinstance(r.json()["error"], str)
    r = http.get("/v2/models/tiny/infer")
    assert (r.status_code, r.json()["reason"]) == (405, "method_not_allowed")
    r = http.get("/v2/nowhere")
    assert (r.status_code, r.json()["reason"]) == (404, "not_found")
    r = http.get("/v2/models/tiny/versions/7")
    assert (r.status_code, r.json()["reason"]) == (404, "version_not_served")


def test_openapi_lists_the_v2_routes(http):
    spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/versions/{version}",
        "/v2/models/{name}/versions/{version}/ready",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ):
        assert path in paths, path
    body = paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/octet-stream"}
    assert "InferRequest" in spec["components"]["schemas"]


def _metric(http: httpx.Client, name: str, label: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_and_micro_batching_are_shared_with_predict(service, http):
    body = {"inputs": [GOOD], "parameters": {"seed": 1}}
    before = _metric(http, "cama_batch_inputs_count", 'model="tiny"')

    def one(i: int) -> httpx.Response:
        with httpx.Client(base_url=service.url, timeout=30) as c:
            if i % 2:
                return c.post("/predict", json={"model": "tiny", "images": [[[0.0] * 28] * 28], "seed": 1})
            return c.post("/v2/models/tiny/infer", json=body)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(32)))
    assert all(r.status_code == 200 for r in responses)
    v2 = [r.json()["outputs"][0]["data"] for r in responses[::2]]
    assert len({json.dumps(p) for p in v2}) == 1  # batching never changes an answer
    passes = _metric(http, "cama_batch_inputs_count", 'model="tiny"') - before
    assert passes < 32  # requests of both routes shared forward passes
    route = 'model="tiny",route="/v2/models/{name}/infer",status="200"'
    assert _metric(http, "cama_requests_total", route) >= 16
    assert 'model="nope"' not in http.get("/metrics").text
