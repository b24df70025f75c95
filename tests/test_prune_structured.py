"""Structured pruning: every zoo model and one test model per coupling pattern."""

import json
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from slimkit import SlimkitError, ZOO, count_params, load, new_model, save
from slimkit.pruning.graph import channel_groups
from slimkit.pruning.structured import apply_plan, plan_channels, prune_channels

X = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def planned_params(model, step):
    """Parameter count the plan promises: apply it to a copy and count (independent of module code)."""
    import copy

    return count_params(apply_plan(copy.deepcopy(model), step))[0]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_prunes_to_a_smaller_working_model_and_reloads(name, tmp_path):
    torch.manual_seed(0)
    model = new_model(name).eval()
    same, _ = prune_channels(model, X, 0.0)
    assert torch.equal(same(X), model(X))  # ratio 0 is a no-op
    step, _ = plan_channels(model, X, 0.5)
    pruned, notes = prune_channels(model, X, 0.5)
    assert pruned(X).shape == (8, 10)
    assert count_params(pruned)[0] == planned_params(model, step) < 0.5 * count_params(model)[0]
    for group in step["groups"]:  # every producer really lost its channels
        blocks = group["size"] // group["block"]
        assert len(group["keep"]) == (blocks - int(0.5 * blocks)) * group["block"]
        for tensor, dim, rep, offset, role, groups in group["members"]:
            module, _, attr = tensor.rpartition(".")
            assert getattr(pruned.get_submodule(module), attr).shape[dim] < getattr(
                model.get_submodule(module), attr).shape[dim]
    save(pruned, tmp_path / "m")
    plan = json.loads((tmp_path / "m" / "slimkit.json").read_text())["plan"]
    assert [s["op"] for s in plan] == ["prune-channels"]
    again = load(tmp_path / "m")
    assert torch.equal(again(X), pruned(X))


def test_vit_prunes_whole_heads_and_mlp_units():
    torch.manual_seed(0)
    model = new_model("vit").eval()
    groups, _ = channel_groups(model, X)
    attn = [g for g in groups if any(m.tensor.endswith("attn.q.weight") for m in g.producers)]
    assert len(attn) == 4 and all(g.block == 16 and g.size == 64 for g in attn)
    members = {m.tensor for m in attn[0].members}
    assert {"blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight",
            "blocks.0.attn.out.weight"} <= members
    residual = [g for g in groups if any(m.tensor == "pos_embed" for m in g.members)]
    assert len(residual) == 1 and {"cls_token", "patch_embed.weight", "norm.weight", "head.weight"} <= {
        m.tensor for m in residual[0].members}
    pruned, _ = prune_channels(model, X, 0.5)
    assert pruned.blocks[0].attn.q.out_features == 32  # 2 of 4 heads of width 16
    assert pruned.blocks[0].fc1.out_features == 64


def zero_channels(*layers_and_dims, channels):
    """Make channels dead: zero the producing rows (and biases) and the consuming columns."""
    with torch.no_grad():
        for layer, dim in layers_and_dims:
            layer.weight.index_fill_(dim, torch.tensor(channels), 0.0)
            if dim == 0 and layer.bias is not None:
                layer.bias[channels] = 0.0


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 6, 3, padding=1)
        self.c = nn.Conv2d(14, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.c(y)), 2), 1))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.se1 = nn.Linear(16, 4)
        self.se2 = nn.Linear(4, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.se2(F.relu(self.se1(x.mean((2, 3))))))
        x = x * s[:, :, None, None]
        return self.fc(x.mean((2, 3)))


class LayerNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.norm(self.fc1(x.flatten(1)))))


def test_concatenation_maps_each_branch_into_the_consumer():
    torch.manual_seed(0)
    model = ConcatNet().eval()
    zero_channels((model.a, 0), channels=[1, 3, 5, 7])
    zero_channels((model.b, 0), channels=[0, 2, 4])
    with torch.no_grad():
        model.c.weight[:, [1, 3, 5, 7]] = 0
        model.c.weight[:, [8, 10, 12]] = 0
    pruned, _ = prune_channels(model, X, 0.5, exclude=["c"])  # keep c's own outputs
    assert (pruned.a.out_channels, pruned.b.out_channels, pruned.c.in_channels) == (4, 3, 7)
    torch.testing.assert_close(pruned(X), model(X), rtol=0, atol=1e-5)  # only dead channels left


def test_flatten_into_linear_keeps_each_channels_block():
    torch.manual_seed(0)
    model = ConcatNet().eval()
    zero_channels((model.c, 0), channels=[0, 1, 2, 3])
    with torch.no_grad():
        model.fc.weight.view(10, 8, 16)[:, :4] = 0
    pruned, _ = prune_channels(model, X, 0.5, exclude=["a", "b"])
    assert pruned.c.out_channels == 4 and pruned.fc.in_features == 64
    torch.testing.assert_close(pruned(X), model(X), rtol=0, atol=1e-5)


def test_squeeze_excitation_multiplication_couples_channels():
    torch.manual_seed(0)
    model = SENet().eval()
    groups, _ = channel_groups(model, X)
    trunk = [g for g in groups if any(m.tensor == "conv.weight" for m in g.members)]
    assert len(trunk) == 1
    assert {"conv.weight", "bn.weight", "bn.running_mean", "se1.weight", "se2.weight", "fc.weight"} <= {
        m.tensor for m in trunk[0].members}
    pruned, _ = prune_channels(model, X, 0.5)
    assert (pruned.conv.out_channels, pruned.bn.num_features, pruned.se2.out_features, pruned.fc.in_features) == (
        8, 8, 8, 8)
    assert pruned(X).shape == (8, 10)


def test_layernorm_is_pruned_with_its_channels():
    torch.manual_seed(0)
    model = LayerNormMLP().eval()
    pruned, _ = prune_channels(model, X, 0.25)
    assert pruned.norm.normalized_shape == (24,) and pruned.norm.weight.shape == (24,)
    assert pruned(X).shape == (8, 10)


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.grouped(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


def test_grouped_convolution_prunes_the_same_number_from_each_group():
    torch.manual_seed(0)
    model = GroupedConvNet().eval()
    dead_in, dead_out = [0, 1, 4, 5], [2, 3, 6, 7]  # two per group of four, on both sides
    zero_channels((model.conv1, 0), channels=dead_in)
    zero_channels((model.grouped, 0), channels=dead_out)
    with torch.no_grad():
        for q in range(2):  # the grouped weight's columns are per-group input positions
            model.grouped.weight[4 * q : 4 * q + 4, [c - 4 * q for c in dead_in if 4 * q <= c < 4 * q + 4]] = 0
        model.fc1.weight[:, dead_out] = 0
    pruned, _ = prune_channels(model, X, 0.5, exclude=["fc1"])
    g = pruned.grouped
    assert (pruned.conv1.out_channels, g.in_channels, g.out_channels, g.groups, g.weight.shape[1]) == (4, 4, 4, 2, 2)
    assert pruned.fc1.in_features == 4
    torch.testing.assert_close(pruned(X), model(X), rtol=0, atol=1e-5)


class HardCodedHeads(nn.Module):
    """Attention whose head count is a constant in its code: pruning heads would break its reshape."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.fc1 = nn.Linear(16, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        b = x.shape[0]
        x = self.embed(x.reshape(b, 8, 8))

        def heads(t):
            return t.reshape(b, 8, 4, 4).transpose(1, 2)  # 4 heads, hard-coded

        att = torch.softmax(heads(self.q(x)) @ heads(self.k(x)).transpose(-2, -1), dim=-1)
        x = x + self.o((att @ heads(self.v(x))).transpose(1, 2).reshape(b, 8, 16))
        return self.out(F.relu(self.fc1(x)).mean(1))


def test_a_group_that_breaks_the_forward_pass_is_skipped_with_a_warning():
    torch.manual_seed(0)
    model = HardCodedHeads().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned, notes = prune_channels(model, X, 0.5)
    assert pruned(X).shape == (8, 10)
    assert pruned.q.out_features == 16  # the heads group was skipped...
    assert pruned.fc1.out_features == 16 and pruned.embed.out_features == 8  # ...the safe groups were pruned
    assert any("skipped the group of k, o, q, v" in str(w.message) for w in caught)
    assert "k, o, q, v" in notes["skipped"]


def test_exclude_and_importance_options():
    torch.manual_seed(0)
    model = new_model("resnet8").eval()
    pruned, notes = prune_channels(model, X, 0.5, exclude=["fc"])  # fc keeps its outputs; its inputs shrink
    assert (pruned.fc.in_features, pruned.fc.out_features, pruned.layer1.conv1.out_channels) == (32, 10, 8)
    assert notes["skipped"] == {}
    pruned, notes = prune_channels(model, X, 0.5, exclude=["layer3.conv2"])
    assert pruned.layer3.conv2.out_channels == 64 and pruned.fc.in_features == 64  # the residual stream, whole
    assert pruned.layer3.conv1.out_channels == 32 and pruned.layer2.conv1.out_channels == 16  # the rest is cut
    reasons = list(notes["skipped"].values())
    assert reasons == ["coupled with excluded layer3.conv2: layer3.shortcut.0 produces the same channels (added or "
                       "multiplied together), so they are kept too"]
    pruned, notes = prune_channels(model, X, 0.5, exclude=["layer1.conv1"])
    assert pruned.layer1.conv1.out_channels == 16 and list(notes["skipped"].values()) == [
        "excluded: layer1.conv1 keeps its output channels"]
    bn, _ = prune_channels(model, X, 0.5, method="bn-scale")
    assert bn(X).shape == (8, 10)
    with pytest.raises(SlimkitError, match="bn-scale needs a BatchNorm"):
        prune_channels(new_model("lenet300"), X, 0.5, method="bn-scale")
    with pytest.raises(SlimkitError, match="taylor importance needs"):
        prune_channels(model, X, 0.5, method="taylor")


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)) if float(x.sum()) > 0 else -self.fc(x.flatten(1))

    with pytest.raises(SlimkitError, match="cannot trace Branchy"):
        prune_channels(Branchy(), X, 0.5)


def test_an_unknown_op_leaves_its_channels_unpruned_with_a_warning():
    class CumsumNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(64, 16)
            self.fc2 = nn.Linear(16, 16)
            self.fc3 = nn.Linear(16, 10)

        def forward(self, x):
            h = torch.cumsum(F.relu(self.fc1(x.flatten(1))), dim=1)  # mixes channels: not prunable
            return self.fc3(F.relu(self.fc2(h)))

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="fc1 .*consumed by cumsum, an operation the analysis does not know"):
        pruned, notes = prune_channels(CumsumNet().eval(), X, 0.5)
    assert (pruned.fc1.out_features, pruned.fc2.out_features) == (16, 8)
    assert "fc1" in notes["pinned"]


class InPlaceActivations(nn.Module):
    """Activations applied in place (as torchvision's MobileNetV3 and EfficientNet do): channels flow through."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.drop = nn.Dropout(0.2, inplace=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.leaky_relu(self.conv1(x), inplace=True)
        x = F.hardsigmoid(F.elu(self.conv2(x), inplace=True), inplace=True)
        return self.fc(self.drop(x.mean((2, 3))))


def test_in_place_activations_do_not_stop_pruning():
    torch.manual_seed(0)
    model = InPlaceActivations().eval()
    pruned, notes = prune_channels(model, X, 0.5)
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.fc.in_features) == (8, 8, 8)
    assert list(notes["pinned"]) == ["fc"] and pruned(X).shape == (8, 10)


class WithAuxiliaryHead(nn.Module):
    """A classifier that reads the trunk only in training mode (GoogLeNet's and Inception's auxiliary heads)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.aux = nn.Linear(16, 10)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        logits = self.fc(F.relu(self.conv2(x)).mean((2, 3)))
        return (logits, self.aux(x.mean((2, 3)))) if self.training else logits


def test_branches_only_training_runs_are_pruned_with_the_trunk():
    torch.manual_seed(0)
    model = WithAuxiliaryHead().eval()
    pruned, _ = prune_channels(model, X, 0.5)
    assert pruned.conv1.out_channels == 8 and pruned.aux.in_features == 8  # the auxiliary head reads 8 now
    logits, aux = pruned.train()(X)  # and the pruned model still trains
    assert logits.shape == aux.shape == (8, 10)


def test_global_scope_ranks_channels_across_groups():
    """ratio of all channels, least important first across groups, at most max_ratio of any one group."""
    torch.manual_seed(0)
    model = InPlaceActivations().eval()
    with torch.no_grad():
        model.conv1.weight[4:] *= 1e-3  # 12 of conv1's 16 channels barely matter; conv2's all do
    pruned, notes = prune_channels(model, X, 0.5, scope="global", max_ratio=0.75)
    assert (pruned.conv1.out_channels, pruned.conv2.out_channels) == (4, 12)  # 16 of 32 removed; conv1 capped at 12
    assert notes["reached"]["scope"] == "global" and notes["reached"]["requested_ratio"] == 0.5
    layered, layer_notes = prune_channels(model, X, 0.5)
    assert (layered.conv1.out_channels, layered.conv2.out_channels) == (8, 8)
    params = layer_notes["reached"]["params"]
    assert params == [sum(p.numel() for p in m.parameters()) for m in (model, layered)]
    assert layer_notes["reached"]["macs_kept"] < 0.5


def test_global_structured_pruning_in_a_stage_reloads(tmp_path, digits):
    from slimkit import load, run_recipe, parse_recipe, save

    save(new_model("resnet8", input_shape=[1, 8, 8], num_classes=10, data="digits"), tmp_path / "m")
    recipe = parse_recipe({"model": {"path": str(tmp_path / "m")}, "evaluate": {"latency": False},
                           "stages": [{"type": "prune", "structured": True, "scope": "global", "sparsity": 0.5}]})
    report = run_recipe(recipe, tmp_path / "r", progress=False)
    reached = report["stages"][1]["notes"]["prune"]["reached"]
    assert reached["scope"] == "global" and reached["params"][1] == report["final"]["params"]
    again = load(tmp_path / "r")
    assert torch.equal(again(digits.x_test), load(tmp_path / "r" / "stages" / "00-prune" / "model")(digits.x_test))
    assert "requested: 50% of the channels overall" in (tmp_path / "r" / "report.html").read_text()
