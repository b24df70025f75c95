import pytest
import torch
from torch import nn

from slimkit import SlimkitError, ZOO, build_model, count_macs, count_params
from slimkit.analyze import layer_stats


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_forward_shapes(name):
    model = build_model({"zoo": name}).eval()
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def conv_macs(cin, cout, k, out_hw, groups=1):
    return cout * out_hw * out_hw * (cin // groups) * k * k


def test_macs_lenet300_by_hand():
    macs, per_layer = count_macs(build_model({"zoo": "lenet300"}), (1, 8, 8))
    assert macs == 64 * 300 + 300 * 100 + 100 * 10
    assert per_layer["fc2"] == 300 * 100


def test_macs_lenet5_by_hand():
    expected = conv_macs(1, 16, 3, 8) + conv_macs(16, 32, 3, 4) + 128 * 120 + 120 * 84 + 84 * 10
    assert count_macs(build_model({"zoo": "lenet5"}), (1, 8, 8))[0] == expected


def test_macs_resnet8_by_hand():
    w = 16
    expected = (
        conv_macs(1, w, 3, 8)
        + 2 * conv_macs(w, w, 3, 8)  # layer1
        + conv_macs(w, 2 * w, 3, 4) + conv_macs(2 * w, 2 * w, 3, 4) + conv_macs(w, 2 * w, 1, 4)  # layer2
        + conv_macs(2 * w, 4 * w, 3, 2) + conv_macs(4 * w, 4 * w, 3, 2) + conv_macs(2 * w, 4 * w, 1, 2)  # layer3
        + 4 * w * 10
    )
    assert count_macs(build_model({"zoo": "resnet8"}), (1, 8, 8))[0] == expected


def test_macs_mobilenetv2_depthwise_by_hand():
    def block(cin, cout, stride, expand, hw_in):
        hidden, hw_out = cin * expand, hw_in // stride
        macs = conv_macs(cin, hidden, 1, hw_in) if expand != 1 else 0
        return macs + conv_macs(hidden, hidden, 3, hw_out, groups=hidden) + conv_macs(hidden, cout, 1, hw_out), hw_out

    total, cin, hw = conv_macs(1, 16, 3, 8), 16, 8
    for expand, cout, stride in ZOO["mobilenetv2"].build.BLOCKS:
        macs, hw = block(cin, cout, stride, expand, hw)
        total, cin = total + macs, cout
    total += conv_macs(cin, 128, 1, hw) + 128 * 10
    assert count_macs(build_model({"zoo": "mobilenetv2"}), (1, 8, 8))[0] == total


def test_macs_vit_counts_attention_matmuls():
    dim, depth, mlp, tokens = 64, 4, 128, 17  # 4 heads of 16: head count does not change MACs
    per_block = 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * mlp
    expected = conv_macs(1, dim, 2, 4) + depth * per_block + dim * 10
    macs, per_layer = count_macs(build_model({"zoo": "vit"}), (1, 8, 8))
    assert macs == expected
    assert per_layer["blocks.0.attn"] == 4 * tokens * dim * dim + 2 * tokens * tokens * dim


def test_count_params_and_nonzero():
    model = nn.Linear(10, 4)
    with torch.no_grad():
        model.weight[:2] = 0
    assert count_params(model) == (44, 44 - 20 + int((model.bias == 0).sum()))


def test_layer_stats_cover_every_parameter():
    model = build_model({"zoo": "resnet8"})
    rows = layer_stats(model, (1, 8, 8))
    assert sum(r.params for r in rows) == sum(p.numel() for p in model.parameters())
    assert {r.kind for r in rows} == {"Conv2d", "BatchNorm2d", "Linear"}


def test_unknown_zoo_and_bad_args():
    with pytest.raises(SlimkitError, match="unknown zoo model 'lenet7'"):
        build_model({"zoo": "lenet7"})
    with pytest.raises(SlimkitError, match="bad arguments"):
        build_model({"zoo": "lenet5", "args": {"depth": 3}})
    with pytest.raises(SlimkitError, match="exactly one of"):
        build_model({"zoo": "lenet5", "factory": "x:y"})
