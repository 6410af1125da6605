"""The unusual score (cama.novelty) and the windowed drift test (cama.drift)."""

from __future__ import annotations

import numpy as np
import pytest

from cama.drift import DriftConfig, DriftDetector
from cama.novelty import RULES, EvidenceReference, MGaussian, log_evidence


def test_log_evidence_is_the_logsumexp_over_classes():
    log_w = np.array([[0.0, np.log(3.0)], [-1000.0, -1000.0]])
    np.testing.assert_allclose(log_evidence(log_w), [np.log(4.0), -1000.0 + np.log(2.0)])


def test_unusual_is_the_share_of_the_reference_explained_better():
    ref = EvidenceReference.from_scores(np.array([3.0, 1.0, 2.0, np.nan, 4.0]), k=10)
    np.testing.assert_allclose(ref.unusual(np.array([5.0, 4.0, 2.5, 1.0, -np.inf])), [0, 0, 0.5, 0.75, 1])
    with pytest.raises(ValueError, match="no finite"):
        EvidenceReference.from_scores(np.array([np.nan]), k=1)


def test_unusual_is_uniform_on_inputs_drawn_like_the_reference():
    rng = np.random.default_rng(0)
    ref = EvidenceReference.from_scores(rng.normal(size=1000), k=10)
    u = ref.unusual(rng.normal(size=20000))
    assert abs(u.mean() - 0.5) < 0.02
    assert abs(u.var() - 1 / 12) < 0.01


def test_q_m_distance_flags_what_the_evidence_explains_better_and_stays_uniform_on_clean():
    rng = np.random.default_rng(2)
    cov = np.array([[1.0, 0.8], [0.8, 1.0]])

    def clean(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(size=n), rng.multivariate_normal([0.0, 0.0], cov, size=n)

    lp, f = clean(1000)
    ref = EvidenceReference.from_scores(lp, 10, features=f, fit_features=clean(1000)[1])
    lp_new, f_new = clean(20000)
    for rule in RULES:  # every rule is close to Uniform(0, 1) on clean inputs
        u = ref.unusual(lp_new, f_new, rule)
        assert abs(u.mean() - 0.5) < 0.03, rule
        assert abs(u.var() - 1 / 12) < 0.01, rule
    # explained *better* than clean (a high log p(x)) but off the clean q(m|x): against the
    # correlation, at an ordinary distance from the mean along each axis
    lp_odd = np.full(200, 5.0)
    f_odd = np.tile([1.5, -1.5], (200, 1))
    assert ref.unusual(lp_odd, f_odd, "evidence").max() == 0.0
    assert ref.unusual(lp_odd, f_odd, "m").min() > 0.99
    assert ref.unusual(lp_odd, f_odd, "max").min() > 0.99
    # a low evidence is still flagged by the combined rule, whatever q(m|x) says
    assert ref.unusual(np.full(5, -5.0), f[:5], "max").min() > 0.99
    # without features, or a reference without q(m|x), the evidence rule answers
    np.testing.assert_array_equal(ref.unusual(lp_new[:50]), ref.unusual(lp_new[:50], None, "evidence"))
    # a reference answers by its own rule unless the call names one
    own = EvidenceReference.from_scores(lp, 10, features=f, rule="evidence")
    np.testing.assert_array_equal(own.unusual(lp_odd, f_odd), ref.unusual(lp_odd, f_odd, "evidence"))
    assert ref.rule == "m_class"  # without labels there is no class Gaussian: the m rule answers
    np.testing.assert_array_equal(ref.unusual(lp_odd, f_odd), ref.unusual(lp_odd, f_odd, "m"))
    plain = EvidenceReference.from_scores(lp, 10)
    np.testing.assert_array_equal(plain.unusual(lp_new[:50], f_new[:50]), ref.unusual(lp_new[:50], None))


def test_the_class_gaussian_flags_what_lies_between_the_classes_and_stays_uniform_on_clean():
    """Two classes far apart in f: an input half-way between them sits near the pooled mean (the
    m rule passes it) but far from both class means (the m_class rule flags it)."""
    rng = np.random.default_rng(4)
    centres = np.array([[-4.0, 0.0], [4.0, 0.0]])

    def clean(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        return rng.normal(size=n), centres[y] + rng.normal(size=(n, 2)), y

    lp, f, _ = clean(1000)
    _, fit, fit_y = clean(1000)
    ref = EvidenceReference.from_scores(lp, 10, features=f, fit_features=fit, fit_labels=fit_y)
    assert ref.class_model is not None
    assert ref.class_model.means.shape == (2, 2)
    lp_new, f_new, _ = clean(20000)
    u = ref.unusual(lp_new, f_new, "m_class")  # uniform on clean inputs, no label needed
    assert abs(u.mean() - 0.5) < 0.03
    assert abs(u.var() - 1 / 12) < 0.01
    between = rng.normal(scale=0.3, size=(200, 2))
    assert ref.unusual(lp_new[:200], between, "m").max() < 0.5
    assert ref.unusual(lp_new[:200], between, "m_class").min() > 0.99
    assert ref.unusual(lp_new[:200], between).min() > 0.99  # m_class is the default rule


def test_the_q_m_gaussian_falls_back_to_a_diagonal_with_few_inputs():
    f = np.random.default_rng(3).normal(size=(6, 4))
    model = MGaussian.fit(f)
    off = model.precision - np.diag(np.diag(model.precision))
    assert np.abs(off).max() == 0.0
    assert np.isfinite(model.distance(f)).all()
    with pytest.raises(ValueError, match="at least two"):
        MGaussian.fit(f[:1])


def test_no_false_alarm_on_a_long_clean_stream_and_one_alarm_per_episode():
    rng = np.random.default_rng(1)
    clock = iter(range(10**6))
    det = DriftDetector(DriftConfig(window=100), clock=lambda: float(next(clock)))
    assert det.update(rng.random(99)) is None
    assert det.state == "warming"
    assert det.update(rng.random(1)) == "normal"
    det.update(rng.random(50000))
    assert det.alarms == 0
    # a manipulation: unusual scores near 1 turn the state within a fraction of the window
    changes = [det.update([s]) for s in rng.uniform(0.8, 1.0, 200)]
    first = changes.index("drift")
    assert 10 < first < 60
    assert det.alarms == 1
    assert det.state == "drift"
    assert det.since > 0
    det.update(rng.random(300))  # back to clean: the state clears
    assert det.state == "normal"
    assert det.alarms == 1


def test_config_rejects_thresholds_that_cannot_clear():
    with pytest.raises(ValueError, match="clear_z"):
        DriftConfig(alarm_z=2.0, clear_z=3.0)


def test_the_benchmark_auroc_and_requests_to_alarm():
    from benchmarks.drift import auroc
    from benchmarks.drift_stream import requests_to_alarm

    assert auroc(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == 1.0
    assert auroc(np.array([0.8, 0.9]), np.array([0.1, 0.2])) == 0.0
    assert auroc(np.full(5, 0.5), np.full(7, 0.5)) == 0.5  # ties count half
    rng = np.random.default_rng(3)
    config = DriftConfig(window=100)
    clean = rng.random(200)
    assert requests_to_alarm(clean, np.ones(500), config, horizon=500) < 40
    assert requests_to_alarm(clean, rng.random(500), config, horizon=500) == 501  # never: horizon + 1


def test_code_length_reads_the_8_bit_image_the_service_decodes():
    import io

    from PIL import Image

    from app.inputs import decode_image_bytes
    from benchmarks.drift_scores import code_length

    rng = np.random.default_rng(5)
    levels = np.zeros((2, 28, 28), np.uint8)
    levels[0, 8:20, 12:16] = 255  # a bar: compresses well
    levels[1] = rng.integers(0, 256, (28, 28))  # noise: does not
    x = (levels.astype(np.float32) / 255.0)[:, None]
    bits = code_length(x)
    assert bits[0] < bits[1]
    assert bits[1] > 8 * 28 * 28 * 0.9  # noise barely compresses
    np.testing.assert_array_equal(code_length(x + 1e-3), bits)  # the same 8-bit levels
    decoded = []
    for image in levels:
        buffer = io.BytesIO()
        Image.fromarray(image, "L").save(buffer, "PNG")
        decoded.append(decode_image_bytes(buffer.getvalue(), 0, 10_000))
    np.testing.assert_array_equal(code_length(np.stack(decoded)), bits)


def test_complexity_correction_is_the_model_code_length_less_the_compressor_s():
    from benchmarks.drift_scores import complexity_corrected

    log_px = np.array([-100.0, -100.0, -50.0])
    bits = np.array([300.0, 200.0, 300.0])
    s = complexity_corrected(log_px, bits)
    np.testing.assert_allclose(s, -log_px / np.log(2.0) - bits)
    assert s[1] > s[0]  # as likely, but simpler: more unusual
    assert s[0] > s[2]  # as complex, but less likely: more unusual
