"""Issue 19 item 5: a weights file sar checked with ``weights_only`` is never handed to a
third-party loader that unpickles it again (torch-fidelity's Inception loader uses
``weights_only=False``): swapping the file after the check must run nothing and change
nothing."""

from pathlib import Path

import torch


class _Payload:
    """Unpickling this creates the marker file (what a crafted checkpoint would run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _inception_state_dict(monkeypatch) -> dict:
    """Random tensors in the layout of torch-fidelity's Inception weights (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as m:
        m.setattr(torch, "load", lambda *a, **k: {})
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["64"], feature_extractor_weights_path="x")
    torch.manual_seed(0)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_inception_weights_swapped_after_the_check_are_never_unpickled(tmp_path, monkeypatch):
    from sar_core.evaluate.metrics import extract_features, get_feature_extractor

    path = tmp_path / "weights-inception.pth"
    torch.save(_inception_state_dict(monkeypatch), path)
    spec = get_feature_extractor("inception", path)  # checked here (weights_only=True)
    images = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    before = extract_features(images, spec, ["64"])["64"]
    marker = tmp_path / "payload-ran"
    torch.save({"fc.weight": _Payload(marker)}, path)  # swapped after the check
    after = extract_features(images, spec, ["64"])["64"]
    assert not marker.exists(), "torch-fidelity unpickled the swapped file"
    assert torch.equal(before, after)  # built from the tensors sar read, not from the new file


def test_every_builtin_extractor_with_a_file_carries_its_checked_tensors():
    """Specs built from a weights file hand the extractor tensors, not a path to re-read
    (the digit classifier is sar's own weights_only reader, so its path is safe)."""
    from sar_core.evaluate.metrics import tensors_buffer

    buf = tensors_buffer({"w": torch.ones(2)})
    assert torch.equal(torch.load(buf, weights_only=True)["w"], torch.ones(2))
    try:
        tensors_buffer({"w": _Payload(Path("x"))})
    except TypeError:
        pass
    else:
        raise AssertionError("a non-tensor value was serialised")
