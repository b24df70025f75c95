"""torchvision classification models: importable beside a CPU-only torch, buildable as architectures, and counted
honestly (attention included)."""

from __future__ import annotations

import json

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
    regnet = new_model({"torchvision": "regnet_y_400mf", "args": {"num_classes": 10}})  # widths from torch ops
    assert sum(p.numel() for p in regnet.parameters()) == 3_907_554 and regnet.eval()(x).shape == (2, 10)
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


def test_digits_resized_and_given_three_channels(digits):
    from torch.nn import functional as F

    from slimkit import load_data

    big = load_data("digits:size=16,channels=3")
    assert big.name == "digits:size=16,channels=3" and big.input_shape == (3, 16, 16)
    expected = F.interpolate(digits.x_test, size=(16, 16), mode="bilinear", align_corners=False)
    assert all(torch.equal(big.x_test[:, c], expected[:, 0]) for c in range(3)) and torch.equal(big.y_test, digits.y_test)
    for spec, message in [("digits:size=2", "size must be"), ("digits:channels=2", "channels must be 1 or 3"),
                          ("digits:depth=3", "unknown option 'depth'")]:
        with pytest.raises(SlimkitError, match=message):
            load_data(spec)


def test_image_folders_of_any_size_become_one_size(tmp_path):
    from PIL import Image

    from slimkit import load_data

    for label, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        (tmp_path / label).mkdir()
        for i in range(6):
            Image.new("RGB", (20 + 5 * i, 12 + 3 * i), color).save(tmp_path / label / f"{i}.png")
    splits = load_data(f"{tmp_path}:size=8,channels=3")
    assert splits.input_shape == (3, 8, 8) and splits.num_classes == 2
    x = torch.cat([splits.x_train, splits.x_val, splits.x_test])
    assert not torch.equal(x[:, 0], x[:, 2])  # colour kept: red and blue images differ by channel
    with pytest.raises(SlimkitError, match="the others are"):
        load_data(str(tmp_path))  # without a size, images of different sizes are refused


def test_train_a_torchvision_architecture_on_real_labels(tv, tmp_path, capsys):
    from slimkit.cli import main

    assert main(["train", "--model", "torchvision:resnet18", "--data", "digits:size=16,channels=3", "--epochs", "2",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    model = load(tmp_path / "r")
    assert model.slimkit_meta["architecture"] == {"torchvision": "resnet18", "args": {"num_classes": 10}}
    assert model.slimkit_meta["data"] == "digits:size=16,channels=3" and model.slimkit_meta["input_shape"] == [3, 16, 16]
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "r"), "--no-latency", "--json"]) == 0  # finds its data again
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] > 0.5 and result["params"] == 11_181_642


def attention_reference(mha, x: torch.Tensor) -> torch.Tensor:
    """Self-attention in float64 from the module's tensors and its own head count (batch first)."""
    w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    q, k, v = (x.double() @ w.T + b).chunk(3, dim=-1)
    heads = mha.num_heads

    def split(t):
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)
    return out @ mha.out_proj.weight.double().T + mha.out_proj.bias.double()


def test_vision_transformer_prunes_its_width_through_multi_head_attention(tv):
    from torchvision.models.vision_transformer import VisionTransformer

    from slimkit.pruning.structured import apply_plan, prune_channels

    def build():
        torch.manual_seed(0)
        return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                                 num_classes=10).eval()

    model, x = build(), torch.randn(4, 3, 32, 32)
    model.slimkit_meta = {"plan": []}  # where the step is recorded, to replay on a fresh model
    pruned, notes = prune_channels(model, x, 0.5)
    assert notes["reached"]["params_kept"] <= 0.30 and notes["reached"]["macs_kept"] <= 0.30
    assert list(notes["pinned"]) == ["heads.head"] and notes["skipped"] == {}
    mha = pruned.encoder.layers[0].self_attention
    assert (mha.embed_dim, mha.num_heads, mha.head_dim) == (32, 4, 8) and pruned.hidden_dim == 32
    assert tuple(mha.in_proj_weight.shape) == (96, 32) and tuple(pruned.class_token.shape) == (1, 1, 32)
    tokens = torch.randn(2, 17, 32)
    with torch.no_grad():
        got = mha(tokens, tokens, tokens, need_weights=False)[0]
    assert torch.allclose(got.double(), attention_reference(mha, tokens), atol=1e-5)
    replayed = apply_plan(build(), pruned.slimkit_meta["plan"][-1])
    with torch.no_grad():
        assert torch.equal(replayed(x), pruned(x))
    pruned.train()
    pruned(x).sum().backward()  # trains as well


def test_swin_prunes_through_window_attention_roll_and_patch_merging(tv):
    from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlockV2, PatchMergingV2

    from slimkit.pruning.structured import apply_plan, prune_channels

    def build(v2: bool):
        torch.manual_seed(0)
        extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
        return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                               num_classes=10, **extra).eval()

    x = torch.randn(4, 3, 32, 32)
    for v2 in (False, True):
        model = build(v2)
        model.slimkit_meta = {"plan": []}
        pruned, notes = prune_channels(model, x, 0.5)
        assert notes["reached"]["params_kept"] <= 0.30 and notes["skipped"] == {}
        assert set(notes["pinned"]) <= {"head"} | {f"features.{s}.{b}.attn.cpb_mlp.2" for s in (1, 3) for b in (0, 1)}
        attn = pruned.features[1][1].attn  # the shifted one: rolled there and back
        assert (attn.qkv.in_features, attn.qkv.out_features, attn.num_heads) == (16, 48, 2)
        with torch.no_grad():
            assert torch.equal(apply_plan(build(v2), pruned.slimkit_meta["plan"][-1])(x), pruned(x))
        pruned.train()
        pruned(x).sum().backward()


def test_maxvit_prunes_through_chunked_qkv_and_grid_partition(tv):
    """MaxViT splits q/k/v with ``chunk``, reshapes heads with a stored ``head_dim`` and partitions its grid with
    ``swapaxes``: heads keep their count and become narrower, and the stored width follows."""
    from torchvision.models.maxvit import MaxVit

    from slimkit.pruning.structured import apply_plan, prune_channels

    def build():
        torch.manual_seed(0)
        return MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[32],
                      block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()

    x = torch.randn(4, 3, 32, 32)
    model = build()
    model.slimkit_meta = {"plan": []}
    pruned, notes = prune_channels(model, x, 0.5)
    assert notes["reached"]["params_kept"] <= 0.30 and notes["skipped"] == {}
    assert set(notes["pinned"]) <= {"classifier.5"}
    attn = pruned.blocks[0].layers[0].layers.window_attention.attn_layer[1]
    assert (attn.to_qkv.in_features, attn.to_qkv.out_features, attn.n_heads, attn.head_dim) == (16, 48, 4, 4)
    with torch.no_grad():
        assert torch.equal(apply_plan(build(), pruned.slimkit_meta["plan"][-1])(x), pruned(x))
    pruned.train()
    pruned(x).sum().backward()
