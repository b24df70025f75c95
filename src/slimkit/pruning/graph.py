"""The channel dependency graph: which tensors must lose the same channels together.

The model is traced with ``torch.export`` (so models slimkit did not define,
with shape arithmetic and attention, trace without rewriting), and every value
in the ATen graph is annotated with the *channel space* each of its dimensions
indexes. Layers that produce channels (conv/linear outputs) open a space; ops
that couple tensors (residual adds, SE multiplications, attention matmuls,
concatenation, depthwise convs) unite spaces; layers that read channels
(conv/linear inputs, BatchNorm, LayerNorm, embeddings used in additions) join
the space as members. A space is prunable when something produces it and
nothing pins it (the model's input or output, an op the analysis does not know).

The result is a list of :class:`Group`s: channel spaces with every tensor
slice that must be removed together.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SlimkitError
from ..inputs import Inputs, export_arguments


@dataclass(frozen=True)
class Member:
    """``tensor`` (a parameter or buffer name) loses index ``offset + c * rep + j`` along ``dim`` for channel c."""

    tensor: str
    dim: int
    role: str  # "out" (produces the channels), "in" (reads them), "in-grouped", "norm", "param"
    rep: int = 1
    offset: int = 0
    groups: int = 1  # "in-grouped": the grouped convolution's group count


@dataclass
class Group:
    """One prunable channel space: ``size`` channels, removed in blocks of ``block`` (a head's width),
    the same number from each of ``parts`` equal contiguous parts (the groups of a grouped convolution)."""

    size: int
    block: int
    members: list[Member]
    parts: int = 1

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "out"]

    def describe(self) -> str:
        layers = sorted({m.tensor.rsplit(".", 1)[0] for m in self.producers})
        return f"{self.size} channels of {', '.join(layers)}" + (f" (blocks of {self.block})" if self.block > 1 else "")


@dataclass
class _Space:
    size: int
    block: int = 1
    parts: int = 1
    members: list[Member] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)  # reasons it must not be pruned


@dataclass(frozen=True)
class _Ann:
    """What one tensor dimension indexes: channel-space segments (several after a concatenation)."""

    segments: tuple[tuple[int, int], ...]  # (space id, channels) in order
    role: str = "full"  # "full" channels, or "blocks"/"inner" after splitting channels into heads
    rep: int = 1


UNARY = {
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardtanh", "hardtanh_", "hardswish",
    "hardswish_", "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "dropout",
    "feature_dropout", "alpha_dropout", "clone", "contiguous", "alias",
    "_to_copy", "to", "detach", "abs", "neg", "exp", "sqrt", "rsqrt", "pow", "square", "erf", "log",
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d",
    "upsample_nearest2d", "upsample_bilinear2d", "constant_pad_nd", "pad", "expand", "lift_fresh_copy",
}
METADATA_ONLY = {"new_zeros", "new_ones", "new_empty", "new_full"}
BINARY = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "where"}


def where(node) -> str:
    """The module whose code ran an operation (a path people know, not an aten node name)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next((value[0] for value in reversed(list(stack.values())) if value and value[0]), "")
    return f"in {path}" if path else "in the model's own forward"


def _export(model: nn.Module, example: Inputs, training: bool):
    with torch.no_grad():
        was_training = model.training
        model.train(training)
        try:
            args, kwargs, _ = export_arguments(example, {})
            return torch.export.export(model, args, kwargs, strict=False)
        except Exception as exc:  # export raises many internal types: name the model and the first line
            raise SlimkitError(f"cannot trace {type(model).__name__} for structured pruning: "
                               f"{str(exc).strip().splitlines()[0]}") from None
        finally:
            model.train(was_training)


def _unused_parameters(model: nn.Module, program) -> set[str]:
    """Parameters the traced forward never reads (export lifts every parameter to an input, used or not)."""
    params = program.graph_signature.inputs_to_parameters
    read = {params[node.name] for node in program.graph.nodes
            if node.op == "placeholder" and node.name in params and node.users}
    return {name for name, _ in model.named_parameters()} - read


def _packed_attention(model: nn.Module) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """Attentions with one packed q/k/v projection whose inner width equals their input width:
    {in-projection weight: (module, heads)} and {out-projection weight: module}."""
    ins, outs = {}, {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            packed, out, heads = "in_proj_weight", "out_proj.weight", module.num_heads
        elif type(module).__name__.startswith("ShiftedWindowAttention") and hasattr(module, "qkv"):
            packed, out, heads = "qkv.weight", "proj.weight", module.num_heads  # torchvision's Swin (V1 and V2)
        elif type(module).__name__ == "RelativePositionalMultiHeadAttention" and hasattr(module, "to_qkv"):
            packed, out, heads = "to_qkv.weight", "merge.weight", module.n_heads  # MaxViT (q/k/v by chunk)
        else:
            continue
        ins[prefix + packed] = (name, heads)
        outs[prefix + out] = name
    return ins, outs


class _Analyzer:
    def __init__(self, model: nn.Module, example: Inputs):
        self.model = model
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.ann: dict[Any, dict[int, _Ann]] = {}
        self.origin: dict[Any, tuple[str, dict[int, int]]] = {}  # parameter views: value dim -> parameter dim
        program = _export(model, example, training=False)
        unused = _unused_parameters(model, program)
        if unused:  # branches only training runs (GoogLeNet's and Inception's auxiliary classifiers) read channels
            try:    # too: cut them there as well, or the pruned model fails in training mode
                trained = _export(copy.deepcopy(model), example, training=True)
            except SlimkitError as exc:
                trained = None
                reason = str(exc).split(": ", 1)[-1]
            if trained is not None and len(_unused_parameters(model, trained)) < len(unused):
                program = trained
            else:
                modules = sorted({name.rpartition(".")[0].split(".")[0] for name in unused})
                warnings.warn(f"{', '.join(modules)} run only in training mode and could not be traced with this "
                              f"example input ({reason if trained is None else 'not reached'}): the pruned model "
                              "may fail in training mode; give a larger example input", stacklevel=4)
        self.graph = program.graph_module.graph
        self.in_projections, self.out_projections = _packed_attention(model)
        self.attention_space: dict[str, int] = {}  # attention module -> the channel space its input width is in
        sig = program.graph_signature
        self.tensor_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.user_inputs = set(sig.user_inputs)

    # --- union-find over channel spaces -------------------------------------------------------
    def new_space(self, size: int) -> int:
        self.spaces.append(_Space(size))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        sa, sb = self.spaces[a], self.spaces[b]
        if sa.size != sb.size:
            self.pin(a, f"coupled with a space of {sb.size} channels")
            self.pin(b, f"coupled with a space of {sa.size} channels")
            return
        self.parent[b] = a
        sa.block = max(sa.block, sb.block)
        sa.parts = math.lcm(sa.parts, sb.parts)
        sa.members += sb.members
        sa.pinned += sb.pinned

    def pin(self, s: int, reason: str) -> None:
        self.spaces[self.find(s)].pinned.append(reason)

    def pin_value(self, node, reason: str) -> None:
        for ann in self.ann.get(node, {}).values():
            for space, _ in ann.segments:
                self.pin(space, reason)

    def add_member(self, ann: _Ann, tensor: str, dim: int, role: str) -> None:
        offset = 0
        for space, size in ann.segments:
            self.spaces[self.find(space)].members.append(Member(tensor, dim, role, ann.rep, offset))
            offset += size * ann.rep

    # --- helpers --------------------------------------------------------------------------------
    @staticmethod
    def shape(node) -> tuple[int, ...]:
        val = node.meta.get("val")
        return tuple(val.shape) if isinstance(val, torch.Tensor) else ()

    def param_name(self, node) -> str | None:
        return self.tensor_of.get(node.name) if getattr(node, "op", None) == "placeholder" else None

    def annotation(self, node) -> dict[int, _Ann]:
        """A value's channel annotation (parameters have none until they meet channels)."""
        if node not in self.ann and self.param_name(node) is not None:
            self.origin[node] = (self.param_name(node), {d: d for d in range(len(self.shape(node)))})
            self.ann[node] = {}
        return self.ann.get(node, {})

    # --- the walk -------------------------------------------------------------------------------
    def run(self) -> list[Group]:
        for node in self.graph.nodes:
            if node.op == "call_function":
                self.visit(node)
            elif node.op == "output":
                for value in node.all_input_nodes:
                    self.pin_value(value, "reaches the model output")
        return self.groups()

    def visit(self, node) -> None:
        target = node.target
        if target is operator.getitem:
            source, index = node.args
            if index == 0 and source in self.ann:
                self.ann[node] = self.ann[source]
            else:
                self.pin_value(source, "used through a tuple element")
            return
        name = getattr(getattr(target, "_schema", None), "name", str(target)).split("::")[-1]
        handler = getattr(self, f"op_{name}", None)
        if handler is not None:
            handler(node)
        elif name in METADATA_ONLY:
            pass  # reads only the tensor's dtype and device: a new tensor of a given shape, no channels
        elif name in UNARY or name.endswith("_") and name[:-1] in UNARY:  # in-place forms too (dropout_, elu_)
            source = node.args[0]
            self.ann[node] = dict(self.annotation(source)) if isinstance(source, torch.fx.Node) else {}
            if source in self.origin:  # expand/copies of a parameter: dims that were not broadcast still map
                pname, dims = self.origin[source]
                src_shape = self.shape(source)
                self.origin[node] = (pname, {d: p for d, p in dims.items() if src_shape[d] == self.shape(node)[d]})
        elif name in BINARY:
            self.binary(node)
        else:
            for value in node.all_input_nodes:
                self.pin_value(value, f"{where(node)}: consumed by {name}, an operation the analysis does not know")

    def binary(self, node) -> None:
        """Broadcasting elementwise ops: aligned channel dimensions must lose the same channels."""
        out_shape = self.shape(node)
        aligned: dict[int, list[tuple[Any, int, _Ann | None, int]]] = {}
        for value in (a for a in node.args if isinstance(a, torch.fx.Node)):
            shape, ann = self.shape(value), self.annotation(value)
            for dim, size in enumerate(shape):
                aligned.setdefault(dim + len(out_shape) - len(shape), []).append((value, dim, ann.get(dim), size))
        result: dict[int, _Ann] = {}
        for out_dim, entries in aligned.items():
            anns = [a for _, _, a, size in entries if a is not None and size > 1]
            if not anns:
                continue
            first = anns[0]
            for value, dim, ann, size in entries:
                if ann is None and size > 1:
                    self.join_untracked(node, value, dim, first)
            for other in anns[1:]:
                if (other.role, other.rep, len(other.segments)) != (first.role, first.rep, len(first.segments)):
                    for space, _ in first.segments + other.segments:
                        self.pin(space, f"{where(node)}: combined with a differently laid-out tensor")
                    continue
                for (s1, _), (s2, _) in zip(first.segments, other.segments):
                    self.union(s1, s2)
            result[out_dim] = first
        self.ann[node] = result

    def join_untracked(self, node, value, dim: int, ann: _Ann) -> None:
        """A tensor meets channels along ``dim``: a parameter joins the space, anything else pins it."""
        name, dims = self.origin.get(value, (None, {}))
        if name is not None and dim in dims and ann.role == "full" and ann.rep == 1 and len(ann.segments) == 1:
            self.spaces[self.find(ann.segments[0][0])].members.append(Member(name, dims[dim], "param"))
            return
        for space, _ in ann.segments:
            self.pin(space, f"{where(node)}: combined with a tensor of unknown channel layout")

    # conv / linear / norms ------------------------------------------------------------------------
    def op_conv2d(self, node) -> None:
        self.conv(node, node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1))

    op_conv1d = op_conv2d

    def op_convolution(self, node) -> None:
        self.conv(node, node.args[8])

    def produce(self, node) -> tuple[str, int] | None:
        """A conv/linear opens a channel space for its outputs; returns (weight name, space id)."""
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        weight = self.param_name(w)
        if weight is None:
            self.pin_value(x, f"{where(node)}: a layer with a computed weight")
            return None
        space = self.new_space(self.shape(w)[0])
        self.spaces[space].members.append(Member(weight, 0, "out"))
        if self.param_name(bias):
            self.spaces[space].members.append(Member(self.param_name(bias), 0, "out"))
        return weight, space

    def conv(self, node, groups: int) -> None:
        x, w = node.args[0], node.args[1]
        produced = self.produce(node)
        if produced is None:
            return
        weight, out_space = produced
        out_channels, in_per_group = self.shape(w)[:2]
        in_ann = self.annotation(x).get(1)
        depthwise = groups > 1 and in_per_group == 1 and out_channels == groups
        if groups > 1 and not depthwise:  # prune the same number of channels from every group
            self.spaces[out_space].parts = groups
            if in_ann is not None and len(in_ann.segments) == 1 and in_ann.rep == 1:
                space = self.spaces[self.find(in_ann.segments[0][0])]
                space.parts = math.lcm(space.parts, groups)
                space.members.append(Member(weight, 1, "in-grouped", groups=groups))
            elif in_ann is not None:
                self.pin_value(x, f"grouped convolution {weight} over concatenated or flattened channels")
        elif depthwise:
            if in_ann is not None and len(in_ann.segments) == 1 and in_ann.rep == 1:
                self.union(in_ann.segments[0][0], out_space)
            else:
                self.pin(out_space, f"depthwise convolution {weight} over untracked channels")
        elif in_ann is not None:
            self.add_member(in_ann, weight, 1, "in")
        out = {d: a for d, a in self.annotation(x).items() if d != 1}
        out[1] = _Ann(((out_space, out_channels),))
        self.ann[node] = out

    def attention_linear(self, node) -> bool:
        """The packed q/k/v in-projection and the out-projection of an attention whose inner width must equal
        its input width (``nn.MultiheadAttention``; torchvision's Swin window attention computes its head width
        from its input width). Both lose the same channel indices: the input width's channel c takes row c of
        q, k and v and column c of the out-projection, and every head loses the same number (heads keep their
        count and become narrower). Returns whether ``node`` was one of the two."""
        weight = self.param_name(node.args[1])
        if weight in self.in_projections:
            owner, heads = self.in_projections[weight]
            x = node.args[0]
            ann = self.annotation(x).get(len(self.shape(x)) - 1)
            if ann is None:
                return True
            if ann.role != "full" or ann.rep != 1 or len(ann.segments) != 1:
                self.pin_value(x, f"{where(node)}: attention over concatenated or split channels")
                return True
            space, width = self.find(ann.segments[0][0]), self.shape(node.args[1])[0] // 3
            self.add_member(ann, weight, 1, "in")
            bias = node.args[2] if len(node.args) > 2 else None
            while isinstance(bias, torch.fx.Node) and self.param_name(bias) is None and bias.args:
                bias = bias.args[0]  # Swin V2 projects with a copy of its bias (the key part zeroed)
            rows = [weight, *([self.param_name(bias)] if isinstance(bias, torch.fx.Node) and self.param_name(bias)
                              else [])]
            for tensor in rows:
                for k in range(3):  # q, k, v
                    self.spaces[space].members.append(Member(tensor, 0, "out", 1, k * width))
            self.spaces[space].parts = math.lcm(self.spaces[space].parts, heads)
            self.attention_space[owner] = space
            return True
        if weight in self.out_projections:
            owner = self.out_projections[weight]
            produced = self.produce(node)
            if produced is not None:
                self.ann[node] = {len(self.shape(node)) - 1: _Ann(((produced[1], self.shape(node)[-1]),))}
                if owner in self.attention_space:
                    self.spaces[self.find(self.attention_space[owner])].members.append(Member(weight, 1, "in"))
                else:
                    self.pin(produced[1], f"in {owner}: attention whose input width the analysis cannot follow")
            return True
        return False

    def op_linear(self, node) -> None:
        if self.attention_linear(node):
            return
        x = node.args[0]
        produced = self.produce(node)
        if produced is None:
            return
        weight, out_space = produced
        out_features = self.spaces[out_space].size
        ann = self.annotation(x)
        last = len(self.shape(x)) - 1
        in_ann = ann.get(last)
        if in_ann is not None:
            if in_ann.role == "full":
                self.add_member(in_ann, weight, 1, "in")
            else:
                self.pin_value(x, f"{where(node)}: linear over a split channel dimension")
        out = {d: a for d, a in ann.items() if d != last}
        out[last] = _Ann(((out_space, out_features),))
        self.ann[node] = out

    def norm(self, node, x, params, channel_dim: int) -> None:
        ann = self.annotation(x)
        channel = ann.get(channel_dim)
        names = [self.param_name(p) for p in params if isinstance(p, torch.fx.Node)]
        if channel is not None and channel.role == "full":
            for name in filter(None, names):
                self.add_member(channel, name, 0, "norm")
        elif channel is not None:  # normalizing over heads or head widths: its parameters could not follow
            self.pin_value(x, f"{where(node)}: normalization over split channels")
        self.ann[node] = dict(ann)

    def op__native_batch_norm_legit_no_training(self, node) -> None:
        x, w, b, mean, var = node.args[:5]
        self.norm(node, x, (w, b, mean, var), 1)

    def op_batch_norm(self, node) -> None:
        x, w, b, mean, var = node.args[:5]
        self.norm(node, x, (w, b, mean, var), 1)

    def op_layer_norm(self, node) -> None:
        x, normalized = node.args[0], node.args[1]
        if len(normalized) != 1:
            self.pin_value(x, f"{where(node)}: layer norm over several dimensions")
        self.norm(node, x, node.args[2:4], len(self.shape(x)) - 1)

    # shape ops ----------------------------------------------------------------------------------
    def op_flatten(self, node) -> None:
        x = node.args[0]
        shape = self.shape(x)
        start = node.args[1] % len(shape) if len(node.args) > 1 else 0
        end = node.args[2] % len(shape) if len(node.args) > 2 else len(shape) - 1
        self.ann[node] = self.merge_dims(node, x, start, end)

    def merge_dims(self, node, x, start: int, end: int) -> dict[int, _Ann]:
        """Annotation after merging dims start..end of ``x`` into one."""
        shape, out = self.shape(x), {}
        for dim, ann in self.annotation(x).items():
            if dim < start:
                out[dim] = ann
            elif dim > end:
                out[dim - (end - start)] = ann
            elif dim == start and ann.role == "full":
                out[start] = _Ann(ann.segments, "full", ann.rep * math.prod(shape[start + 1 : end + 1]))
            else:
                self.pin_value(x, f"{where(node)}: channels interleaved by a reshape")
        return out

    def op_view(self, node) -> None:
        self.reshape(node)

    op_reshape = op_view
    op__unsafe_view = op_view

    def reshape(self, node) -> None:
        """Follow channel dims through view/reshape: kept, split into heads, merged back, or flattened."""
        x = node.args[0]
        src, dst = self.shape(x), self.shape(node)
        ann = self.annotation(x)
        if list(src) == list(dst):  # a reshape to the shape it has (transformers' SDPA path writes one)
            self.ann[node] = dict(ann)
            return
        dst_prefix = [math.prod(dst[:i]) for i in range(len(dst))]
        out: dict[int, _Ann] = {}
        for dim, a in ann.items():
            if a.role == "inner":
                continue  # travels with its "blocks" dimension
            size, before = src[dim], math.prod(src[:dim])
            starts = [i for i in range(len(dst)) if dst_prefix[i] == before]
            i = starts[-1] if starts else None
            single = len(a.segments) == 1 and a.rep == 1
            if i is None:
                pass
            elif a.role == "full" and dst[i] == size:
                out[i] = a
                continue
            elif a.role == "full" and single and i + 1 < len(dst) and dst[i] * dst[i + 1] == size and dst[i] > 1:
                space = self.spaces[self.find(a.segments[0][0])]
                space.block = max(space.block, dst[i + 1])
                out[i], out[i + 1] = _Ann(a.segments, "blocks"), _Ann(a.segments, "inner")
                continue
            elif a.role == "blocks" and dim + 1 < len(src) and dst[i] == size * src[dim + 1]:
                out[i] = _Ann(a.segments, "full")
                continue
            elif a.role == "full":
                tail = 1
                for k in range(dim + 1, len(src)):
                    tail *= src[k]
                    if size * tail == dst[i]:
                        out[i] = _Ann(a.segments, "full", a.rep * tail)
                        break
                if i in out:
                    continue
            self.pin_value(x, f"{where(node)}: a reshape the analysis cannot follow ({list(src)} -> {list(dst)})")
        self.ann[node] = out

    def op_transpose(self, node) -> None:
        x, a, b = node.args[0], node.args[1], node.args[2]
        n = len(self.shape(x))
        a, b = a % n, b % n
        perm = list(range(n))
        perm[a], perm[b] = perm[b], perm[a]
        self.permute(node, x, perm)

    op_swapaxes = op_transpose  # MaxViT's grid partition
    op_swapdims = op_transpose

    def op_permute(self, node) -> None:
        x = node.args[0]
        n = len(self.shape(x))
        self.permute(node, x, [d % n for d in node.args[1]])

    def op_t(self, node) -> None:
        self.permute(node, node.args[0], [1, 0])

    def permute(self, node, x, perm: list[int]) -> None:
        ann = self.annotation(x)
        self.ann[node] = {new: ann[old] for new, old in enumerate(perm) if old in ann}

    def op_unsqueeze(self, node) -> None:
        x, dim = node.args
        dim = dim % (len(self.shape(x)) + 1)
        self.ann[node] = {(d + 1 if d >= dim else d): a for d, a in self.annotation(x).items()}

    def op_squeeze(self, node) -> None:
        x = node.args[0]
        src = self.shape(x)
        dims = node.args[1] if len(node.args) > 1 else [d for d, s in enumerate(src) if s == 1]
        dims = sorted({d % len(src) for d in ([dims] if isinstance(dims, int) else dims) if src[d % len(src)] == 1})
        self.ann[node] = {d - sum(r < d for r in dims): a for d, a in self.annotation(x).items() if d not in dims}

    def op_roll(self, node) -> None:
        x, dims = node.args[0], node.args[2] if len(node.args) > 2 else []
        n = len(self.shape(x))
        ann = self.annotation(x)
        if not dims or {d % n for d in ([dims] if isinstance(dims, int) else dims)} & set(ann):
            self.pin_value(x, f"{where(node)}: rolls the channel dimension")
        self.ann[node] = dict(ann)

    def op_select(self, node) -> None:
        x, dim = node.args[0], node.args[1] % len(self.shape(node.args[0]))
        ann = self.annotation(x)
        if dim in ann:
            self.pin_value(x, f"{where(node)}: indexes into the channel dimension")
        self.ann[node] = {(d - 1 if d > dim else d): a for d, a in ann.items() if d != dim}

    def op_slice(self, node) -> None:
        x, dim = node.args[0], node.args[1] % len(self.shape(node.args[0])) if len(node.args) > 1 else 0
        ann = self.annotation(x)
        if dim in ann and self.shape(node)[dim] != self.shape(x)[dim]:
            self.pin_value(x, f"{where(node)}: slices the channel dimension")
        self.ann[node] = dict(ann)

    def op_mean(self, node) -> None:
        x = node.args[0]
        n = len(self.shape(x))
        dims = node.args[1] if len(node.args) > 1 else list(range(n))
        dims = {d % n for d in ([dims] if isinstance(dims, int) else dims)}
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        ann = self.annotation(x)
        if dims & set(ann):
            self.pin_value(x, f"{where(node)}: reduces over channels")
        self.ann[node] = {(d if keep else d - sum(r < d for r in dims)): a for d, a in ann.items() if d not in dims}

    op_sum = op_mean
    op_amax = op_mean

    def op_softmax(self, node) -> None:
        x, dim = node.args[0], node.args[1] % len(self.shape(node.args[0]))
        ann = self.annotation(x)
        if dim in ann:
            self.pin_value(x, f"{where(node)}: softmax over channels")
        self.ann[node] = dict(ann)

    op__softmax = op_softmax
    op_log_softmax = op_softmax

    def op_cat(self, node) -> None:
        tensors = node.args[0]
        n = len(self.shape(node))
        dim = (node.args[1] if len(node.args) > 1 else 0) % n
        anns = [self.annotation(t) for t in tensors]
        out: dict[int, _Ann] = {}
        for d in range(n):
            parts = [a.get(d) for a in anns]
            if d == dim:
                if all(p is not None and p.role == "full" and p.rep == 1 for p in parts):
                    out[d] = _Ann(tuple(seg for p in parts for seg in p.segments))
                elif any(p is not None for p in parts):
                    for t in tensors:
                        self.pin_value(t, f"{where(node)}: concatenated with untracked channels")
                continue
            present = [p for p in parts if p is not None]
            if not present:
                continue
            for t, p in zip(tensors, parts):
                if p is None:
                    self.join_untracked(node, t, d, present[0])
            for other in present[1:]:
                for (s1, _), (s2, _) in zip(present[0].segments, other.segments):
                    self.union(s1, s2)
            out[d] = present[0]
        self.ann[node] = out

    def op_matmul(self, node) -> None:
        a, b = node.args[0], node.args[1]
        sa, sb, so = self.shape(a), self.shape(b), self.shape(node)
        if len(sa) < 2 or len(sb) < 2:
            for v in (a, b):
                self.pin_value(v, f"{where(node)}: matmul with a vector")
            return
        aa, ab = self.annotation(a), self.annotation(b)
        # contracted dimension: a[-1] with b[-2]
        ca, cb = aa.get(len(sa) - 1), ab.get(len(sb) - 2)
        if ca is not None and cb is not None and ca.role == cb.role and len(ca.segments) == len(cb.segments) == 1:
            self.union(ca.segments[0][0], cb.segments[0][0])
        elif ca is not None or cb is not None:
            for v in (a, b):
                self.pin_value(v, f"{where(node)}: matmul contracts over channels it cannot couple")
        out: dict[int, _Ann] = {}
        for d in range(len(so) - 2):  # broadcast batch dims
            da, db = d - (len(so) - len(sa)), d - (len(so) - len(sb))
            pa, pb = aa.get(da) if da >= 0 else None, ab.get(db) if db >= 0 else None
            if pa is not None and pb is not None:
                self.union(pa.segments[0][0], pb.segments[0][0])
            if pa or pb:
                out[d] = pa or pb
        if len(sa) - 2 in aa:
            out[len(so) - 2] = aa[len(sa) - 2]
        if len(sb) - 1 in ab:
            out[len(so) - 1] = ab[len(sb) - 1]
        self.ann[node] = out

    op_bmm = op_matmul

    def op_scaled_dot_product_attention(self, node) -> None:
        q, k, v = node.args[:3]
        aq, ak, av = (self.annotation(t) for t in (q, k, v))
        n = len(self.shape(q))
        for d in range(n):
            present = [a[d] for a in (aq, ak, av) if d in a and (d != n - 2)]
            for other in present[1:]:
                self.union(present[0].segments[0][0], other.segments[0][0])
        self.ann[node] = {d: av[d] for d in av if d != n - 2}

    # --- result ---------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        roots = {self.find(i) for i in range(len(self.spaces))}
        out = []
        for root in sorted(roots):
            space = self.spaces[root]
            if space.pinned or not any(m.role == "out" for m in space.members):
                continue
            if space.size % (space.parts * space.block):
                continue  # heads that straddle convolution groups: leave the channels alone
            out.append(Group(space.size, space.block, list(dict.fromkeys(space.members)), space.parts))
        return out

    def pinned(self) -> dict[str, list[str]]:
        """Producer layers whose channels cannot be pruned, with the reasons (for messages and reports)."""
        out: dict[str, list[str]] = {}
        for root in {self.find(i) for i in range(len(self.spaces))}:
            space = self.spaces[root]
            producers = sorted({m.tensor.rsplit(".", 1)[0] for m in space.members if m.role == "out"})
            if space.pinned and producers:
                out[", ".join(producers)] = sorted(set(space.pinned))
        return out


def channel_groups(model: nn.Module, example: Inputs) -> tuple[list[Group], dict[str, list[str]]]:
    """Prunable channel groups of ``model`` and, for the rest, why they are pinned."""
    analyzer = _Analyzer(model, example)
    groups = analyzer.run()
    return groups, analyzer.pinned()
