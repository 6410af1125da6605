"""The stream builder: seeded, each source and class where the protocol puts it, Dirichlet batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from training.streams import (
    CLEAN,
    PER_SOURCE,
    PROTOCOLS,
    build_stream,
    build_streams,
    dirichlet_rows,
    draw_pool,
)

SOURCES = ("fog", "zigzag", "brightness")


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(123).integers(0, 10, size=2000)


@pytest.fixture(scope="module")
def pools(labels: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {name: draw_pool(labels, 300, rng) for name in SOURCES}


def streams(labels: np.ndarray, pools: dict[str, np.ndarray], seed: int) -> dict:
    clean = draw_pool(labels, 200, np.random.default_rng(9))
    return build_streams(PROTOCOLS, pools, pools, labels, seed, clean=clean)


def test_same_seed_same_stream_and_another_seed_another(labels, pools) -> None:
    a, b, c = (streams(labels, pools, s) for s in (0, 0, 1))
    for protocol in PROTOCOLS:
        assert np.array_equal(a[protocol].index, b[protocol].index)
        assert np.array_equal(a[protocol].source, b[protocol].source)
        assert not np.array_equal(a[protocol].index, c[protocol].index), protocol


def test_every_pool_image_once_in_its_own_segment(labels, pools) -> None:
    for protocol, stream in streams(labels, pools, 0).items():
        if protocol in ("continual", "label_shift"):
            continue
        assert len(stream) == 3 * 300
        assert np.array_equal(stream.label, labels[stream.index])
        for code, name in enumerate(stream.sources):
            rows = stream.index[stream.source == code]
            assert sorted(rows.tolist()) == sorted(pools[name].tolist()), (protocol, name)
        if protocol in PER_SOURCE:
            assert stream.reset_at_segments
            assert [s.name for s in stream.segments] == list(SOURCES)
            for seg in stream.segments:
                code = stream.sources.index(seg.name)
                assert (stream.source[seg.start : seg.stop] == code).all()


def test_mixed_interleaves_the_sources(labels, pools) -> None:
    stream = streams(labels, pools, 0)["mixed"]
    assert not stream.reset_at_segments
    assert len(stream.segments) == 1
    for start, stop in stream.batches():  # each batch of 100 holds every source
        assert len(np.unique(stream.source[start:stop])) == len(SOURCES)


def test_batches_have_the_protocol_size_and_never_span_sources(labels, pools) -> None:
    for protocol, stream in streams(labels, pools, 0).items():
        spans = list(stream.batches())
        assert spans[0][0] == 0
        assert spans[-1][1] == len(stream)
        assert all(b[0] == a[1] for a, b in itertools.pairwise(spans))
        ends = {seg.stop for seg in stream.segments}
        for start, stop in spans:  # full batches, but for the last of a segment
            assert stop - start == stream.batch or (stop in ends and stop - start < stream.batch), protocol
        assert stream.batch == {"batch1": 1, "batch4": 4, "batch16": 16}.get(protocol, 100)
        for start, stop in spans:
            assert len(np.unique(stream.source[start:stop])) == 1 or protocol == "mixed"


def test_class_sorted_is_sorted_within_each_source(labels, pools) -> None:
    stream = streams(labels, pools, 0)["class_sorted"]
    for seg in stream.segments:
        assert (np.diff(stream.label[seg.start : seg.stop]) >= 0).all()


def test_label_shift_batches_are_dominated_by_few_classes(labels, pools) -> None:
    built = streams(labels, pools, 0)

    def top_share(protocol: str) -> float:
        stream = built[protocol]
        shares = [np.bincount(stream.label[a:b], minlength=10).max() / (b - a) for a, b in stream.batches()]
        return float(np.mean(shares))

    assert top_share("iid") < 0.25  # about balanced: the largest class near 1/10
    assert top_share("label_shift") > 0.5
    stream = built["label_shift"]
    assert np.array_equal(stream.label, labels[stream.index])
    assert [s.name for s in stream.segments] == list(SOURCES)
    for seg in stream.segments:  # per source: its own pool's size, distinct rows
        rows = stream.index[seg.start : seg.stop]
        assert len(rows) == 300
        assert len(np.unique(rows)) == 300
        assert (stream.source[seg.start : seg.stop] == stream.sources.index(seg.name)).all()


def test_dirichlet_rows_are_distinct_and_concentrate_classes() -> None:
    labels = np.repeat(np.arange(10), 300)
    rows = dirichlet_rows(labels, 1000, 100, 0.1, np.random.default_rng(0))
    assert len(rows) == 1000
    assert len(np.unique(rows)) == 1000
    shares = [np.bincount(labels[rows[i : i + 100]], minlength=10).max() / 100 for i in range(0, 1000, 100)]
    assert np.mean(shares) > 0.5
    spread = dirichlet_rows(labels, 1000, 100, 1e4, np.random.default_rng(0))  # near-uniform proportions
    assert np.mean([len(np.unique(labels[spread[i : i + 100]])) for i in range(0, 1000, 100)]) == 10
    few = dirichlet_rows(np.repeat(np.arange(10), 20), 200, 100, 0.1, np.random.default_rng(1))
    assert sorted(few.tolist()) == list(range(200))  # classes that run out give way to the others


def test_continual_order_clean_sources_clean(labels, pools) -> None:
    stream = streams(labels, pools, 0)["continual"]
    assert not stream.reset_at_segments
    assert [s.name for s in stream.segments] == [CLEAN, *SOURCES, CLEAN]
    first, last = stream.segments[0], stream.segments[-1]
    assert np.array_equal(stream.index[first.start : first.stop], stream.index[last.start : last.stop])
    assert (stream.source[first.start : first.stop] == stream.sources.index(CLEAN)).all()
    for seg in stream.segments[1:-1]:
        assert sorted(stream.index[seg.start : seg.stop].tolist()) == sorted(pools[seg.name].tolist())


def test_images_are_looked_up_by_source_and_row(labels, pools) -> None:
    stream = streams(labels, pools, 0)["mixed"]
    sets = {name: np.arange(2000)[:, None] * 10 + i for i, name in enumerate(SOURCES)}
    x = stream.images(sets)
    assert np.array_equal(x[:, 0], stream.index * 10 + stream.source)


def test_unknown_protocol_and_continual_without_clean_are_refused(labels, pools) -> None:
    with pytest.raises(ValueError, match="unknown protocol"):
        build_stream("shuffled", pools, labels, 0)
    with pytest.raises(ValueError, match="clean"):
        build_stream("continual", pools, labels, 0)
