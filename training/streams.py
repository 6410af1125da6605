"""Seeded test streams: which image comes when, for the streams deployed models meet.

A stream is an order over images of several sources (``"clean"`` and corruptions), each image a
row of a source's test set, cut into batches (what one request or one adaptation step sees) and
into segments (one source each, or one ``"mixed"`` segment). Only indices are held; the images are
looked up by the caller, so one stream serves every method alike.

Protocols (:func:`build_stream`):

- ``iid``: per source, its images in random order, batches of 100;
- ``label_shift``: per source, as many images as its pool holds, in batches of 100 whose class
  proportions are drawn from a Dirichlet(``alpha`` = 0.1) (the label-shift protocol of the
  test-time adaptation literature); the images are drawn from the source's whole test set, since
  a pool of a few hundred holds too few images of each class for a batch of one class;
- ``class_sorted``: per source, sorted by class (ties in random order), batches of 100;
- ``batch1``, ``batch4``, ``batch16``: per source, random order, batches of 1, 4 and 16;
- ``mixed``: every source's images shuffled into one segment, batches of 100;
- ``continual``: a clean segment, then each source in the given order, then the same clean
  images again in the same order, batches of 100.

Per-source protocols mark each segment as a point where a method that knows the boundaries may
reset (``Stream.reset_at_segments``); ``mixed`` and ``continual`` have no such point.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CLEAN = "clean"
PER_SOURCE = ("iid", "label_shift", "class_sorted", "batch1", "batch4", "batch16")
PROTOCOLS = (*PER_SOURCE, "mixed", "continual")
BATCH = 100
DIRICHLET_ALPHA = 0.1


@dataclass(frozen=True)
class Segment:
    """Items ``[start, stop)`` of a stream, all of source ``name`` (or ``"mixed"``)."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class Stream:
    """Item ``t`` is row ``index[t]`` of source ``sources[source[t]]``, with label ``label[t]``."""

    protocol: str
    sources: tuple[str, ...]
    source: np.ndarray  # (N,) int, into ``sources``
    index: np.ndarray  # (N,) int, a row of that source's test set
    label: np.ndarray  # (N,) int
    batch: int
    segments: tuple[Segment, ...]
    reset_at_segments: bool

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def batches(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of each batch, in order; a batch never spans two segments."""
        for seg in self.segments:
            for start in range(seg.start, seg.stop, self.batch):
                yield start, min(start + self.batch, seg.stop)

    def images(self, sets: Mapping[str, np.ndarray]) -> np.ndarray:
        """The stream's images ``(N, ...)`` looked up in ``sets`` (source name -> test images)."""
        first = sets[self.sources[0]]
        out = np.empty((len(self), *first.shape[1:]), dtype=first.dtype)
        for code, name in enumerate(self.sources):
            at = self.source == code
            out[at] = sets[name][self.index[at]]
        return out


def draw_pool(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct rows of a test set, drawn at random."""
    return np.sort(rng.choice(len(labels), size=n, replace=False))


def dirichlet_rows(
    labels: np.ndarray, n: int, batch: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """``n`` distinct rows of a test set with labels ``labels``, in batches under label shift: each
    batch's class proportions are drawn from ``Dirichlet(alpha 1)``, its class counts from the
    multinomial of those proportions, and its images of each class from that class's rows not yet
    used (a class with too few rows left gives its share to the others)."""
    classes = np.unique(labels)
    left = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    rows: list[int] = []
    while len(rows) < n:
        size = min(batch, n - len(rows))
        counts = rng.multinomial(size, rng.dirichlet(np.full(len(classes), alpha)))
        for i in np.argsort(-counts, kind="stable"):
            take = min(int(counts[i]), len(left[i]))
            rows += [left[i].pop() for _ in range(take)]
            counts[i] -= take
            spare = int(counts[i])
            for j in range(len(classes)):  # a class that ran out: its share goes to the next ones
                if spare == 0:
                    break
                extra = min(spare, len(left[j]))
                rows += [left[j].pop() for _ in range(extra)]
                spare -= extra
    batches = [rng.permutation(rows[i : i + batch]) for i in range(0, n, batch)]
    return np.concatenate(batches).astype(np.int64)


def _order(protocol: str, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The order of one source's pool under a per-source protocol."""
    if protocol == "class_sorted":
        shuffled = rng.permutation(len(labels))
        return shuffled[np.argsort(labels[shuffled], kind="stable")]
    return rng.permutation(len(labels))


def batch_size(protocol: str) -> int:
    """Images per batch: 1, 4 or 16 for ``batch<n>``, else 100."""
    return int(protocol.removeprefix("batch")) if protocol.startswith("batch") else BATCH


def build_stream(
    protocol: str,
    pools: Mapping[str, np.ndarray],
    labels: np.ndarray,
    seed: int,
    *,
    clean: np.ndarray | None = None,
    alpha: float = DIRICHLET_ALPHA,
) -> Stream:
    """The stream of ``protocol`` over ``pools`` (source -> rows of its test set, in the order the
    sources follow one another), all sources sharing the test labels ``labels``; ``clean`` (rows of
    the clean test set) opens and closes ``continual``. The same arguments give the same stream."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
    rng = np.random.default_rng([seed, PROTOCOLS.index(protocol)])
    names = list(pools)
    if protocol == "continual":
        if clean is None:
            raise ValueError("continual needs clean rows")
        clean_order = clean[rng.permutation(len(clean))]
        plan = [(CLEAN, clean_order), *((n, pools[n][rng.permutation(len(pools[n]))]) for n in names)]
        plan.append((CLEAN, clean_order))
        sources = (CLEAN, *names)
    else:
        sources = tuple(names)
        plan = []
        for n in names:
            if protocol == "label_shift":  # its own rows: a pool has too few images of each class
                plan.append((n, dirichlet_rows(labels, len(pools[n]), BATCH, alpha, rng)))
            else:
                plan.append((n, pools[n][_order(protocol, labels[pools[n]], rng)]))
    code = {name: i for i, name in enumerate(sources)}
    source = np.concatenate([np.full(len(rows), code[name]) for name, rows in plan]).astype(np.int64)
    index = np.concatenate([rows for _, rows in plan]).astype(np.int64)
    segments: list[Segment] = []
    start = 0
    for name, rows in plan:
        segments.append(Segment(name, start, start + len(rows)))
        start += len(rows)
    if protocol == "mixed":
        perm = rng.permutation(len(index))
        source, index = source[perm], index[perm]
        segments = [Segment("mixed", 0, len(index))]
    return Stream(
        protocol=protocol,
        sources=sources,
        source=source,
        index=index,
        label=labels[index],
        batch=batch_size(protocol),
        segments=tuple(segments),
        reset_at_segments=protocol in PER_SOURCE,
    )


def build_streams(
    protocols: Sequence[str],
    per_source: Mapping[str, np.ndarray],
    whole: Mapping[str, np.ndarray],
    labels: np.ndarray,
    seed: int,
    *,
    clean: np.ndarray,
) -> dict[str, Stream]:
    """Every protocol's stream: the per-source ones over ``per_source`` pools, ``mixed`` and
    ``continual`` over ``whole`` (and ``clean``)."""
    streams = {}
    for protocol in protocols:
        pools = per_source if protocol in PER_SOURCE else whole
        streams[protocol] = build_stream(protocol, pools, labels, seed, clean=clean)
    return streams
