"""Self-describing checkpoints: round trip, provenance, refusal of bad files."""

from __future__ import annotations

import os

import pytest
import torch

from cama import objectives as O
from cama.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, sha256_file
from cama.config import ImageCamaConfig
from cama.image_model import ImageCama, with_m_pathway


@pytest.mark.parametrize("pathway", ["additive", "transform"])
def test_round_trip_gives_identical_outputs(tmp_path, pathway):
    torch.manual_seed(0)
    model = ImageCama(ImageCamaConfig.tiny())
    if pathway == "transform":
        model = with_m_pathway(model, "transform")
        with torch.no_grad():
            assert model.mechanisms is not None
            model.mechanisms.head.weight.normal_(0, 0.05)
    model.eval()
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, model, provenance={"data_sha256": "abc"}, metrics={"acc": 0.5})
    assert digest == sha256_file(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, ImageCama)
    assert loaded.config == model.config
    assert meta.provenance["data_sha256"] == "abc"
    assert "git_commit" in meta.provenance
    assert meta.metrics == {"acc": 0.5}
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    noise = O.sample_noise(model, 3, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(
            O.bayes_log_weights(model, x, noise=noise), O.bayes_log_weights(loaded, x, noise=noise)
        )


def test_bad_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
    path = tmp_path / "m.pt"
    save_checkpoint(path, ImageCama(ImageCamaConfig.tiny()))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)
    payload = torch.load(path, weights_only=True)
    payload["schema_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="schema version"):
        load_checkpoint(tmp_path / "future.pt")
    payload["schema_version"] = 1
    payload["config"]["kind"] = "audio"
    torch.save(payload, tmp_path / "kind.pt")
    with pytest.raises(CheckpointError, match="unknown model kind"):
        load_checkpoint(tmp_path / "kind.pt")
