"""Decoding request inputs: every bad input is refused with a precise, machine-readable reason."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from app.inputs import files_to_inputs, image_shape, images_to_inputs, records_to_inputs
from app.schemas import MeasurementRecord
from harness.inputs import bomb_png, png_base64
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


RGB = (3, 32, 32)


def rgb_png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """``pixels (3, H, W)`` in [0, 1] -> an RGB file."""
    buf = io.BytesIO()
    Image.fromarray((pixels.transpose(1, 2, 0) * 255).round().astype(np.uint8), "RGB").save(buf, format=fmt)
    return buf.getvalue()


def test_rgb_models_take_rgb_files_grey_files_and_channels_first_arrays():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, RGB).astype(np.float32) / 255
    png = rgb_png(pixels)
    inputs = images_to_inputs([base64.b64encode(png).decode(), pixels.tolist()], LIMIT, RGB)
    assert inputs.x.shape == (2, *RGB)
    np.testing.assert_array_equal(inputs.x[0], pixels)  # channels in R, G, B order, rows then columns
    np.testing.assert_array_equal(inputs.x[1], pixels)
    grey = files_to_inputs([encoded("PNG", (32, 32))], LIMIT, RGB).x
    np.testing.assert_allclose(grey, 128 / 255, atol=1e-6)  # a grey file is repeated over the channels
    flat = np.broadcast_to(np.array([0.2, 0.5, 0.8], dtype=np.float32)[:, None, None], RGB)
    jpeg = files_to_inputs([rgb_png(flat, "JPEG")], LIMIT, RGB).x  # lossy: a flat colour survives
    np.testing.assert_allclose(jpeg[0], flat, atol=3 / 255)
    assert image_shape({"x": [3, 32, 32]}) == RGB


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (base64.b64encode(encoded("PNG")).decode(), "bad_shape"),  # 28x28 to a 32x32 model
        ([[0.5] * 32] * 32, "bad_shape"),  # H x W only for one-channel models
        ([[[0.5] * 32] * 32] * 1, "bad_shape"),
        ([[[0.5] * 32] * 32] * 2 + [[[0.5] * 31] * 32], "bad_shape"),  # ragged
        ([[[0.5] * 32] * 32] * 2 + [[["a"] * 32] * 32], "bad_shape"),
        ([[[1.5] * 32] * 32] * 3, "out_of_range"),
    ],
)
def test_bad_rgb_images_have_reasons(item, reason):
    assert reason_of(images_to_inputs, [item], LIMIT, RGB) == reason


def test_one_channel_models_also_take_channels_first_arrays_and_refuse_other_shapes():
    image = np.full((1, 28, 28), 0.25, dtype=np.float32)
    np.testing.assert_array_equal(images_to_inputs([image.tolist()], LIMIT).x[0], image)
    assert reason_of(image_shape, {"x": [10]}) == "wrong_input_kind"  # a measurement model
    assert reason_of(image_shape, {"x": [2, 32, 32]}) == "wrong_input_kind"


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
