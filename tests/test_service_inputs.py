"""Decoding request inputs: every bad input is refused with a precise, machine-readable reason."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from app.inputs import files_to_inputs, images_to_inputs, records_to_inputs
from app.schemas import MeasurementRecord
from benchmarks.harness import bomb_png, png_base64
from store.data import check_shapes
from store.errors import InvalidInputError as InputError
from store.errors import LimitExceededError as TooLargeError

LIMIT = 1 << 20


def encoded(fmt: str, size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


def reason_of(fn, *args) -> str:
    with pytest.raises((InputError, TooLargeError)) as info:
        fn(*args)
    return info.value.reason


def test_png_jpeg_data_url_and_arrays_decode_to_unit_range():
    image = np.linspace(0, 1, 784, dtype=np.float32).reshape(28, 28)
    jpeg = base64.b64encode(encoded("JPEG")).decode()
    inputs = images_to_inputs(
        [png_base64(image), "data:image/png;base64," + png_base64(image), jpeg, image.tolist()], LIMIT
    )
    assert inputs.x.shape == (4, 1, 28, 28)
    assert inputs.x.dtype == np.float32
    np.testing.assert_allclose(inputs.x[0, 0], image, atol=1 / 255)
    np.testing.assert_array_equal(inputs.x[0], inputs.x[1])
    np.testing.assert_allclose(inputs.x[2], 128 / 255, atol=2 / 255)
    np.testing.assert_array_equal(inputs.x[3, 0], image)
    assert files_to_inputs([encoded("PNG", mode="RGB")], LIMIT).x.shape == (1, 1, 28, 28)


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ("not base64!", "undecodable_image"),
        (base64.b64encode(b"hello world!").decode(), "undecodable_image"),
        (base64.b64encode(encoded("PNG", (32, 32))).decode(), "bad_shape"),
        (base64.b64encode(encoded("GIF")).decode(), "undecodable_image"),
        ([[0.5] * 28] * 27, "bad_shape"),
        ([[0.5] * 27] * 28, "bad_shape"),
        ([[float("nan")] * 28] * 28, "non_finite"),
        ([[float("inf")] * 28] * 28, "non_finite"),
        ([[1.5] * 28] * 28, "out_of_range"),
        ([[-0.1] * 28] * 28, "out_of_range"),
    ],
)
def test_bad_images_have_reasons(item, reason):
    assert reason_of(images_to_inputs, [item], LIMIT) == reason


def test_limits_and_empty_inputs():
    assert reason_of(images_to_inputs, [], LIMIT) == "no_inputs"
    assert reason_of(files_to_inputs, [b"x" * 100], 64) == "image_too_large"
    assert reason_of(files_to_inputs, [b"garbage"], LIMIT) == "undecodable_image"


def test_records_and_their_shapes():
    records = [MeasurementRecord(a=[0.1] * 5, c=[0.2] * 5, x=[0.3] * 10) for _ in range(3)]
    inputs = records_to_inputs(records)
    assert inputs.kind == "measurement"
    assert inputs.x.shape == (3, 10)
    assert [c.shape for c in inputs.cond] == [(3, 5), (3, 5)]
    check_shapes(inputs, "measurement", {"x": [10], "a": [5], "c": [5]})
    with pytest.raises(InputError, match="expects") as info:
        check_shapes(inputs, "measurement", {"x": [11], "a": [5], "c": [5]})
    assert info.value.reason == "bad_shape"
    with pytest.raises(InputError) as info:
        check_shapes(inputs, "image", {"x": [1, 28, 28]})
    assert info.value.reason == "wrong_input_kind"
    ragged = [*records, MeasurementRecord(a=[0.1] * 4, c=[0.2] * 5, x=[0.3] * 10)]
    assert reason_of(records_to_inputs, ragged) == "bad_shape"
    nan = [MeasurementRecord(a=[float("nan")] * 5, c=[0.2] * 5, x=[0.3] * 10)]
    assert reason_of(records_to_inputs, nan) == "non_finite"


def test_a_decompression_bomb_is_refused_without_decoding_it():
    bomb = bomb_png()
    assert len(bomb) < 100_000
    assert reason_of(files_to_inputs, [bomb], LIMIT) == "image_too_large"
    assert reason_of(images_to_inputs, [base64.b64encode(bomb).decode()], LIMIT) == "image_too_large"
