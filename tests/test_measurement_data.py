"""The appendix-C measurement generator: shapes, seeding, and manipulations through the equations."""

from __future__ import annotations

import numpy as np
import pytest

from training.measurement_data import (
    GeneratorConfig,
    StructuralEquations,
    column_names,
    g,
    make_dataset,
    schema_dict,
    to_frame,
)


def test_default_split_and_shapes() -> None:
    ds = make_dataset(0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (450, 50, 500)
    for part in (ds.train, ds.val, ds.test):
        n = len(part)
        assert part.a.shape == (n, 5)
        assert part.c.shape == (n, 5)
        assert part.x.shape == (n, 10)
        assert part.y.shape == (n,)
        assert part.y.dtype == np.int64
        assert part.a.dtype == part.c.dtype == part.x.dtype == np.float32
        assert np.isfinite(part.x).all()
    assert set(np.unique(ds.train.y)) == set(range(5))


def test_larger_sizes_are_available() -> None:
    ds = make_dataset(3, n_train=4000, n_val=100, n_test=2000)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4000, 100, 2000)
    # the children are normalised to unit variance before the noise
    var = ds.train.x.var(0)
    expected = 1.0 + GeneratorConfig().noise_x ** 2
    assert np.allclose(var, expected, rtol=0.15)
    assert np.allclose(ds.train.x.mean(0), 0.0, atol=0.1)


def test_seeding_is_reproducible_and_seeds_differ() -> None:
    a, b, c = make_dataset(7), make_dataset(7), make_dataset(8)
    for name in ("a", "c", "x", "y", "eps_x"):
        assert np.array_equal(getattr(a.train, name), getattr(b.train, name))
        assert np.array_equal(getattr(a.test, name), getattr(b.test, name))
    assert np.array_equal(a.equations.w, b.equations.w)
    assert not np.array_equal(a.equations.w, c.equations.w)
    assert not np.array_equal(a.train.x, c.train.x)


def test_label_follows_the_argmax_of_g_without_noise() -> None:
    eq = StructuralEquations.create(0, GeneratorConfig(noise_y=0.0, reference_size=1000))
    a = np.random.default_rng(0).standard_normal((200, 5))
    assert np.array_equal(eq.label(a, np.random.default_rng(1)), np.argmax(0.2 * a**2 - 0.8 * a, axis=1))
    assert np.array_equal(g(a), 0.2 * a**2 - 0.8 * a)


def test_coparent_shift_regenerates_x_through_f() -> None:
    ds = make_dataset(1)
    eq, data = ds.equations, ds.test
    shifted = eq.shift_coparents(data, 2.0)
    assert np.array_equal(shifted.y, data.y)
    assert np.array_equal(shifted.a, data.a)
    assert np.allclose(shifted.c, data.c + 2.0 * eq.c_std, atol=1e-6)
    # same exogenous noise, new co-parents, the very same mechanism f
    assert np.allclose(shifted.x, eq.f(data.y, shifted.c.astype(np.float64)) + data.eps_x, atol=1e-4)
    assert np.allclose(shifted.x - data.x, eq.f(data.y, shifted.c) - eq.f(data.y, data.c), atol=1e-4)
    # the change in X depends on Y and C (quadratic f), it is not a constant offset
    delta = shifted.x - data.x
    assert delta.std(0).min() > 0.05
    # and it is consistent with f: refitting on the shifted rows would be the identity
    assert np.allclose(eq.shift_coparents(data, 0.0).x, data.x, atol=1e-5)


def test_child_shift_moves_x_directly() -> None:
    ds = make_dataset(2)
    eq, data = ds.equations, ds.test
    shifted = eq.shift_children(data, 1.5)
    assert np.array_equal(shifted.c, data.c)
    assert np.array_equal(shifted.y, data.y)
    assert np.allclose(shifted.x - data.x, 1.5 * eq.x_std, atol=1e-5)
    assert eq.x_std == pytest.approx(np.sqrt(1 + GeneratorConfig().noise_x ** 2))


def test_frame_has_the_declared_schema_columns() -> None:
    ds = make_dataset(0)
    frame = to_frame(ds.val)
    names = column_names()
    assert list(frame.columns) == [*names["parents"], *names["coparents"], *names["children"], "y"]
    assert schema_dict()["target"] == "y"
    assert np.allclose(frame[names["children"]].to_numpy(), ds.val.x)
