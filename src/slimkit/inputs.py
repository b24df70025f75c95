"""Batches for models that take several tensors: an image and a feature vector, or inputs by name.

slimkit handles a batch of inputs the same way everywhere: it takes ``len`` (the batch size),
slices rows, moves it with ``.to(device)``, concatenates batches and feeds it to the model. A
``MultiInput`` holds several tensors that share the batch axis, positional (``model(a, b)``) or by
name (``model(image=a, meta=b)``), and does each of those to all of them at once, so every method
written for a one-tensor batch runs on it. ``call(model, x)`` feeds either kind, ``InputSpec``
records the names, shapes and dtypes (a saved model rebuilds example inputs from it to trace itself
with), and ``export_arguments`` gives the exporters one named graph input per tensor.
"""

from __future__ import annotations

import inspect
import math
from typing import Annotated, Any, Literal, Mapping, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .errors import SlimkitError
from .limits import MAX_INPUT_ELEMENTS, MAX_TENSOR_DIMS, echo

MAX_INPUTS = 64
SINGLE_INPUT_NAME = "input"  # the graph input of a model that takes one tensor
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool")


class MultiInput:
    """Several input tensors with a shared first (batch) axis: a tuple fed positionally, or a mapping fed by
    name. Indexing, ``len`` and ``.to`` act on every tensor, as they act on one tensor."""

    def __init__(self, tensors: tuple | list | Mapping[str, torch.Tensor]):
        self.keyword = isinstance(tensors, Mapping)
        items = list(tensors.items()) if self.keyword else [(f"input_{i}", t) for i, t in enumerate(tensors)]
        if not 1 <= len(items) <= MAX_INPUTS:
            raise SlimkitError(f"a model's inputs are 1 to {MAX_INPUTS} tensors, got {len(items)}")
        for name, value in items:
            if not isinstance(name, str) or not name.isidentifier():
                raise SlimkitError(f"input names must be Python identifiers (a model's keyword arguments), got "
                                   f"{echo(name)}")
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                got = "a 0-d tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
                raise SlimkitError(f"input {name} is {got}: every input must be a tensor with a batch axis first")
        sizes = {name: len(value) for name, value in items}
        if len(set(sizes.values())) > 1:
            raise SlimkitError("a model's inputs must share the batch size (first axis), got "
                               + ", ".join(f"{name}: {size}" for name, size in sizes.items()))
        self.names = tuple(name for name, _ in items)
        self.tensors = tuple(value for _, value in items)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index) -> "MultiInput":
        return self._with([t[index] for t in self.tensors])

    def to(self, *args, **kwargs) -> "MultiInput":
        return self._with([t.to(*args, **kwargs) for t in self.tensors])

    def feed(self, model: nn.Module) -> Any:
        return model(**self.as_dict()) if self.keyword else model(*self.tensors)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.tensors))

    def spec(self) -> "InputSpec":
        return InputSpec(keyword=self.keyword, tensors=[
            TensorSignature(name=name, shape=list(t.shape[1:]), dtype=dtype_name(t.dtype))
            for name, t in zip(self.names, self.tensors)])

    def _with(self, tensors: list[torch.Tensor]) -> "MultiInput":
        return MultiInput(dict(zip(self.names, tensors)) if self.keyword else tensors)

    def __repr__(self) -> str:
        return f"MultiInput({describe(self)})"


Inputs = Union[torch.Tensor, MultiInput]


def as_inputs(value: Any) -> Inputs:
    """A tensor as it is; a tuple/list of tensors (positional) or a mapping of them (by name) as a ``MultiInput``."""
    if isinstance(value, (torch.Tensor, MultiInput)):
        return value
    if isinstance(value, (tuple, list, Mapping)):
        return MultiInput(value)
    raise SlimkitError(f"model inputs must be a tensor, a tuple of tensors or a dict of tensors, got "
                       f"{type(value).__name__}")


def call(model: nn.Module, x: Inputs) -> Any:
    """``model`` run on a batch of one input or several."""
    return x.feed(model) if isinstance(x, MultiInput) else model(x)


def from_call(args: tuple, kwargs: dict[str, Any]) -> Inputs:
    """The batch a forward was called with (the inverse of ``call``), for a module that wraps another model."""
    if kwargs:
        return MultiInput(kwargs)
    return args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else MultiInput(args)


def flat(x: Inputs) -> tuple[torch.Tensor, ...]:
    """The tensors of a batch in the order a captured graph takes them."""
    return x.tensors if isinstance(x, MultiInput) else (x,)


def rows_of(x: Inputs, size: int) -> Inputs:
    """``size`` rows of ``x``: its first ones, repeated from the start when it has fewer."""
    return concat([x] * -(-size // len(x)))[:size] if len(x) < size else x[:size]


def concat(parts: list[Inputs]) -> Inputs:
    """Batches of the same inputs as one batch."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    first = parts[0]
    if not all(isinstance(p, MultiInput) and p.names == first.names for p in parts):
        raise SlimkitError("batches differ in their inputs: " + "; ".join(describe(p) for p in parts[:3]))
    return first._with([torch.cat(column) for column in zip(*(p.tensors for p in parts))])


def describe(x: Inputs) -> str:
    """The per-sample shapes of a batch, for messages: ``[1, 8, 8]`` or ``image [1, 8, 8], meta [3]``."""
    if isinstance(x, MultiInput):
        return ", ".join(f"{name} {list(t.shape[1:])}" for name, t in zip(x.names, x.tensors))
    return str(list(x.shape[1:]))


def signature(x: Inputs) -> "tuple[int, ...] | InputSpec":
    """What a model records about its inputs: one tensor's per-sample shape, or every input's spec."""
    return x.spec() if isinstance(x, MultiInput) else tuple(x.shape[1:])


def signature_json(sig: "tuple[int, ...] | InputSpec") -> Any:
    return sig.model_dump() if isinstance(sig, InputSpec) else list(sig)


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise SlimkitError(f"inputs of dtype {name} are not supported (supported: {', '.join(DTYPES)})")
    return name


def graph_input_names(model: nn.Module, x: Inputs) -> list[str]:
    """The names an exported graph gives its inputs: a mapping's keys, a positional model's own parameter
    names (``forward(self, image, meta)``), else ``input`` / ``input_0``, ``input_1``..."""
    if not isinstance(x, MultiInput):
        return [SINGLE_INPUT_NAME]
    return list(x.names) if x.keyword else positional_names(model, list(x.names))


def positional_names(model: nn.Module, fallback: list[str]) -> list[str]:
    """The names ``model.forward`` gives its first ``len(fallback)`` positional parameters, else ``fallback``."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return fallback
    names = [p.name for p in params[: len(fallback)]]
    return names if len(names) == len(fallback) and len(set(names)) == len(names) else fallback


def export_arguments(x: Inputs, dims: dict[int, Any]) -> tuple[tuple, dict[str, torch.Tensor], Any]:
    """(args, kwargs, dynamic_shapes) for ``torch.export`` / ``torch.onnx.export``: the batch axis (``dims[0]``)
    shared by every input, and for one tensor all of ``dims``; no ``dims``: static shapes."""
    if not isinstance(x, MultiInput):
        return (x,), {}, (dims,) if dims else None
    if not dims:
        return ((), x.as_dict(), None) if x.keyword else (tuple(x.tensors), {}, None)
    batch = {0: dims[0]}
    if x.keyword:
        return (), x.as_dict(), {name: batch for name in x.names}
    return tuple(x.tensors), {}, tuple(batch for _ in x.tensors)


class TensorSignature(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    shape: list[Annotated[int, Field(ge=1)]] = Field(max_length=MAX_TENSOR_DIMS - 1)  # per sample
    dtype: Literal[DTYPES]  # type: ignore[valid-type]


class InputSpec(BaseModel):
    """The inputs of a model that takes several tensors, as recorded in its metadata and plan steps."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    keyword: bool
    tensors: list[TensorSignature] = Field(min_length=1, max_length=MAX_INPUTS)

    @model_validator(mode="after")
    def _bounded(self) -> "InputSpec":
        if len({t.name for t in self.tensors}) < len(self.tensors):
            raise ValueError("input names repeat")
        if sum(math.prod(t.shape) for t in self.tensors) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"the inputs hold more than {MAX_INPUT_ELEMENTS:,} elements per sample")
        return self

    def synthetic(self, batch: int, generator: torch.Generator | None = None, fill: str = "random") -> MultiInput:
        """Inputs of these shapes and dtypes: standard normal floats (zeros with ``fill="zeros"``), integer
        zeros (a valid index into any table) and true masks."""
        generator = generator or torch.Generator().manual_seed(0)
        tensors = []
        for t in self.tensors:
            dtype = getattr(torch, t.dtype)
            if dtype.is_floating_point and fill == "random":
                tensors.append(torch.randn(batch, *t.shape, generator=generator).to(dtype))
            else:
                tensors.append((torch.ones if dtype == torch.bool else torch.zeros)(batch, *t.shape, dtype=dtype))
        return MultiInput({t.name: v for t, v in zip(self.tensors, tensors)} if self.keyword else tensors)


def recorded_signature(meta: Mapping[str, Any]) -> "tuple[int, ...] | InputSpec | None":
    """The inputs a model's metadata records: ``inputs`` (several tensors) or ``input_shape`` (one)."""
    if meta.get("inputs"):
        return InputSpec.model_validate(meta["inputs"])
    return tuple(meta["input_shape"]) if meta.get("input_shape") else None


def remember_signature(model: nn.Module, sig: "tuple[int, ...] | InputSpec") -> None:
    """Record ``sig`` in the metadata of a model that records no inputs yet (one a user built and trained or
    compressed on their own data), so that its saved directory can be traced, counted and exported without
    data."""
    meta = getattr(model, "slimkit_meta", None)
    if isinstance(meta, dict) and recorded_signature(meta) is None:
        model.slimkit_meta = {**meta, **signature_meta(named_for(model, sig))}


def named_for(model: nn.Module, sig: "tuple[int, ...] | InputSpec") -> "tuple[int, ...] | InputSpec":
    """``sig`` with positional inputs named as ``model``'s forward names them (``image``, not ``input_0``)."""
    if not isinstance(sig, InputSpec) or sig.keyword:
        return sig
    names = positional_names(model, [t.name for t in sig.tensors])
    return InputSpec(keyword=False, tensors=[t.model_copy(update={"name": n}) for t, n in zip(sig.tensors, names)])


def signature_meta(sig: "tuple[int, ...] | InputSpec") -> dict[str, Any]:
    """The metadata fields that record ``sig`` (the inverse of ``recorded_signature``)."""
    return {"inputs": sig.model_dump()} if isinstance(sig, InputSpec) else {"input_shape": list(sig)}
