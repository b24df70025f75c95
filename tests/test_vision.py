"""torchvision classification models: importable beside a CPU-only torch, buildable as architectures, and counted
honestly (attention included)."""

from __future__ import annotations

import pytest
import torch

from slimkit import SlimkitError, load, new_model, save
from slimkit.analyze import count_macs

vision = pytest.importorskip("slimkit.models.vision")


@pytest.fixture(scope="module")
def tv():
    try:
        return vision.import_torchvision()
    except SlimkitError as exc:
        pytest.skip(str(exc))


def test_every_classification_architecture_is_listed_and_buildable_by_name(tv, tmp_path):
    names = vision.classification_models()
    assert {"resnet18", "mobilenet_v3_small", "vit_b_16", "swin_t", "convnext_tiny"} <= set(names)
    model = new_model({"torchvision": "resnet18", "args": {"num_classes": 10}}, input_shape=[3, 32, 32]).eval()
    save(model, tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load(tmp_path / "m")(x), model(x))  # no trust_code: only a name from torchvision's list
    with pytest.raises(SlimkitError, match="unknown torchvision classification model 'fasterrcnn_resnet50_fpn'"):
        new_model({"torchvision": "fasterrcnn_resnet50_fpn"})
    with pytest.raises(SlimkitError, match="'weights' download from a hub"):
        new_model({"torchvision": "resnet18", "args": {"weights": "DEFAULT"}})


def vit_macs(image: int, patch: int, layers: int, d: int, mlp: int, classes: int) -> int:
    n = (image // patch) ** 2 + 1  # patches and the class token
    block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * mlp  # qkv, QK^T and AV, out, MLP
    return d * 3 * patch * patch * (n - 1) + layers * block + d * classes


def swin_stage(tokens: int, c: int, window: int, blocks: int) -> int:
    return blocks * (tokens * c * 3 * c + 2 * tokens * window * window * c + tokens * c * c + 2 * tokens * c * 4 * c)


def test_attention_is_counted(tv):
    """nn.MultiheadAttention's fast path and CPU scaled_dot_product_attention are one fused op each: counted by
    their analytic cost, the torch setting put back afterwards."""
    fast = torch.backends.mha.get_fastpath_enabled()
    vit = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                      mlp_dim=64, num_classes=10)
    assert count_macs(vit, (3, 32, 32))[0] == vit_macs(32, 8, 2, 32, 64, 10)
    swin = tv.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                     window_size=[4, 4], num_classes=10)
    expected = 16 * 3 * 16 * 64 + swin_stage(64, 16, 4, 2) + 16 * 64 * 32 + swin_stage(16, 32, 4, 2) + 32 * 10
    assert count_macs(swin, (3, 32, 32))[0] == expected
    assert count_macs(tv.models.vit_b_16(), (3, 224, 224))[0] == vit_macs(224, 16, 12, 768, 3072, 1000)
    assert torch.backends.mha.get_fastpath_enabled() == fast
