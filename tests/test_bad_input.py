"""The bad-input battery: every malformed, damaged, hostile or colliding input is a named error, and nothing is lost.

Each case builds its input in a fresh folder and runs one command, through the CLI (in process:
exit status 2, one ``error:`` message) or through the Python API (``SlimkitError``). For every case
the message must name what is wrong, and the folder (inputs, outputs, everything) must be byte for
byte what it was before: no input changed, no partial output, no temporary or lock file left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from slimkit import SlimkitError, load, new_model, save
from slimkit.cli import main
from slimkit.limits import available_cores
from slimkit.modelfile import pack, unpack

CASES: dict[str, Callable] = {}


def case(fn: Callable) -> Callable:
    """Register ``fn(ws) -> (argv or callable, fragments the message must contain)`` as a battery case."""
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def snapshot(root: Path) -> dict[str, str]:
    """Every file (SHA-256 and mode) and folder under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel + "/"] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() + oct(path.stat().st_mode)
    return out


@dataclass
class Workspace:
    """Inputs a case can start from, built on demand inside the case's folder."""

    root: Path
    trained_run: Path

    def model_dir(self, name: str = "m") -> Path:
        """A lenet300 whose fc2 is 90% pruned, so its file holds sparse (integer-coded) streams too."""
        torch.manual_seed(0)
        model = new_model("lenet300", input_shape=[1, 8, 8], num_classes=10, data="digits")
        with torch.no_grad():
            weight = model.fc2.weight
            weight[weight.abs() < weight.abs().quantile(0.9)] = 0
        return save(model, self.root / name)

    def run_dir(self, name: str = "run") -> Path:
        shutil.copytree(self.trained_run, self.root / name)
        return self.root / name

    def slim(self, name: str = "m.slim") -> Path:
        pack(self.model_dir("packed-source"), self.root / name)
        shutil.rmtree(self.root / "packed-source")
        return self.root / name

    def with_meta(self, change: Callable[[dict], object], name: str = "m") -> Path:
        """A model directory whose slimkit.json ``change`` edited (the weights, and their digest, untouched)."""
        folder = self.model_dir(name)
        meta = json.loads((folder / "slimkit.json").read_text())
        replaced = change(meta)
        (folder / "slimkit.json").write_text(json.dumps(meta if replaced is None else replaced))
        return folder

    def with_slim_header(self, change: Callable[[dict], None], name: str = "h.slim") -> Path:
        """A .slim file whose header ``change`` edited, its checksum and length made consistent again."""
        blob = self.slim(name).read_bytes()
        magic, version, length, _ = struct.unpack_from("<4sHII", blob)
        content = json.loads(zlib.decompress(blob[14: 14 + length]))
        change(content)
        header = zlib.compress(json.dumps(content).encode())
        (self.root / name).write_bytes(struct.pack("<4sHII", magic, version, len(header), zlib.crc32(header))
                                       + header + blob[14 + length:])
        return self.root / name

    def npz(self, name: str = "d.npz", **arrays) -> Path:
        np.savez(self.root / name, **arrays)
        return self.root / name

    def recipe(self, text: str, name: str = "r.yaml") -> Path:
        (self.root / name).write_text(text)
        return self.root / name


def flip(path: Path, offset: int) -> Path:
    blob = bytearray(path.read_bytes())
    blob[offset % len(blob)] ^= 0x20
    path.write_bytes(bytes(blob))
    return path


def splits(n_classes: int = 10, side: int = 8, n: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: (rng.standard_normal((n, 1, side, side)).astype(np.float32) if k[0] == "x"
                else np.arange(n) % n_classes) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}


# ---------------------------------------------------------------------------------------------- outputs

@case
def case_unpack_into_the_folder_holding_the_input(ws):
    folder = ws.root / "d"
    folder.mkdir()
    slim = ws.slim("d/g.slim")
    return ["unpack", slim, "--out", folder], ["contains the input"]


@case
def case_unpack_onto_its_own_input(ws):
    slim = ws.slim()
    return ["unpack", slim, "--out", slim], ["is the input"]


@case
def case_unpack_over_a_folder_of_other_files(ws):
    (ws.root / "mine").mkdir()
    (ws.root / "mine" / "notes.txt").write_text("mine")
    return ["unpack", ws.slim(), "--out", ws.root / "mine"], ["files slimkit did not write", "--overwrite"]


@case
def case_prune_onto_its_own_input(ws):
    run = ws.run_dir()
    return ["prune", run, "--sparsity", "0.5", "--out", run, "--no-progress"], ["contains the input", "model"]


@case
def case_prune_into_its_own_input(ws):
    run = ws.run_dir()
    return ["prune", run, "--sparsity", "0.5", "--out", run / "model" / "pruned", "--no-progress"], ["lies inside"]


@case
def case_pack_into_a_model_directory(ws):
    model = ws.model_dir()
    return ["pack", ws.run_dir(), "--out", model / "x.slim"], ["inside the model directory"]


@case
def case_export_over_a_foreign_onnx_file(ws):
    (ws.root / "theirs.onnx").write_bytes(b"not slimkit's")
    return ["export", ws.run_dir(), "--out", ws.root / "theirs.onnx"], ["files slimkit did not write"]


@case
def case_export_onto_a_directory(ws):
    (ws.root / "m.onnx").mkdir()
    return ["export", ws.run_dir(), "--out", ws.root / "m.onnx"], ["is a directory"]


@case
def case_pack_onto_a_directory(ws):
    (ws.root / "x.slim").mkdir()
    return ["pack", ws.run_dir(), "--out", ws.root / "x.slim"], ["is a directory"]


@case
def case_pack_over_a_foreign_file(ws):
    (ws.root / "x.slim").write_text("a file of mine")
    return ["pack", ws.run_dir(), "--out", ws.root / "x.slim"], ["files slimkit did not write"]


@case
def case_train_into_an_earlier_run_without_resume(ws):
    return ["train", "--model", "lenet300", "--epochs", "1", "--out", ws.run_dir(), "--no-progress"], \
        ["earlier slimkit training run", "--resume", "--overwrite"]


@case
def case_train_into_a_foreign_folder(ws):
    (ws.root / "docs").mkdir()
    (ws.root / "docs" / "thesis.tex").write_text("years of work")
    return ["train", "--model", "lenet300", "--epochs", "1", "--out", ws.root / "docs"], ["files slimkit did not write"]


@case
def case_train_output_holding_its_data(ws):
    (ws.root / "out").mkdir()
    data = ws.npz("out/d.npz", **splits())
    return ["train", "--model", "lenet300", "--data", data, "--out", ws.root / "out"], ["contains the input"]


@case
def case_run_output_holding_its_recipe(ws):
    (ws.root / "out").mkdir()
    recipe = ws.recipe("model: {zoo: lenet300}\n", "out/r.yaml")
    return ["run", recipe, "--out", ws.root / "out"], ["contains the input"]


@case
def case_run_over_a_model_directory(ws):
    recipe = ws.recipe("model: {zoo: lenet300, train: {epochs: 1}}\n")
    return ["run", recipe, "--out", ws.model_dir(), "--no-progress"], ["holds a slimkit model directory"]


@case
def case_sensitivity_into_a_foreign_folder(ws):
    (ws.root / "plots").mkdir()
    (ws.root / "plots" / "fig.png").write_bytes(b"\x89PNG")
    return ["sensitivity", ws.run_dir(), "--data", "digits", "--out", ws.root / "plots"], ["did not write"]


@case
def case_save_over_a_foreign_folder(ws):
    (ws.root / "mine").mkdir()
    (ws.root / "mine" / "a.txt").write_text("x")
    model = load(ws.model_dir())
    return (lambda: save(model, ws.root / "mine")), ["files slimkit did not write", "overwrite"]


@case
def case_output_under_a_regular_file(ws):
    (ws.root / "file").write_text("x")
    return ["unpack", ws.slim(), "--out", ws.root / "file" / "sub"], ["cannot write", "is a file, not a folder"]


@case
def case_output_locked_by_a_live_process(ws):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ws.cleanup.append(holder.kill)
    from slimkit.io import host_tag
    from slimkit.outputs import _process_start

    lock = ws.root / ".x.slim.slimkit-lock"
    lock.write_text(json.dumps({"pid": holder.pid, "host": host_tag(), "start": _process_start(holder.pid), "time": 0}))
    return ["pack", ws.run_dir(), "--out", ws.root / "x.slim"], ["being written by another slimkit process",
                                                                   str(holder.pid)]


# ---------------------------------------------------------------------------------------------- integrity

@case
def case_bit_flip_in_the_safetensors_header(ws):
    model = ws.model_dir()
    flip(model / "model.safetensors", 20)
    return ["analyze", model, "--no-latency"], ["damaged", "SHA-256"]


@case
def case_bit_flip_in_the_first_weight(ws):
    model = ws.model_dir()
    header = 8 + int.from_bytes((model / "model.safetensors").read_bytes()[:8], "little")
    flip(model / "model.safetensors", header + 1)
    return ["analyze", model, "--no-latency"], ["model.safetensors is damaged", "--no-verify"]


@case
def case_bit_flip_in_the_middle_of_the_weights(ws):
    model = ws.model_dir()
    flip(model / "model.safetensors", (model / "model.safetensors").stat().st_size // 2)
    return (lambda: load(model)), ["model.safetensors is damaged"]


@case
def case_bit_flip_in_the_last_byte(ws):
    model = ws.model_dir()
    flip(model / "model.safetensors", -1)
    return ["pack", model, "--out", ws.root / "p.slim"], ["is damaged"]


@case
def case_truncated_weights(ws):
    model = ws.model_dir()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return (lambda: load(model)), ["is damaged"]


@case
def case_int32_weights_where_floats_belong(ws):
    model = load(ws.model_dir())
    state = {k: v.to(torch.int32) if k == "fc1.weight" else v for k, v in model.state_dict().items()}
    save_file(state, str(ws.root / "w.safetensors"))
    return ["analyze", ws.root / "w.safetensors", "--arch", "lenet300", "--no-latency"], \
        ["'fc1.weight' is int32", "expects float32"]


@case
def case_damaged_slim_payload(ws):
    target = flip(ws.slim(), -3)
    return (lambda: load(target)), ["is corrupt (checksum mismatch)"]


@case
def case_truncated_slim(ws):
    slim = ws.slim()
    slim.write_bytes(slim.read_bytes()[:-9])
    return ["unpack", slim, "--out", ws.root / "u"], ["truncated"]


# ---------------------------------------------------------------------------------------------- malformed fields

@case
def case_prune_step_without_groups(ws):
    model = ws.with_meta(lambda m: m.update(plan=[{"op": "prune-channels", "method": "l1", "ratio": 0.5}]))
    return ["analyze", model, "--no-latency"], ["plan[0] (prune-channels) is malformed", "plan[0].groups"]


@case
def case_factorize_step_without_layers(ws):
    model = ws.with_meta(lambda m: m.update(plan=[{"op": "factorize"}]))
    return (lambda: load(model)), ["plan[0].layers: required key is missing"]


@case
def case_quantize_step_without_folded_batchnorm(ws):
    step = {"op": "quantize-static", "input_shape": [1, 8, 8], "weights": {"fc1.weight": {"input": "x"}},
            "activations": {}}
    model = ws.with_meta(lambda m: m.update(plan=[step]))
    return ["export", model, "--out", ws.root / "q.onnx"], ["plan[0].folded_batchnorm: required key is missing"]


@case
def case_plan_is_a_number(ws):
    target = ws.with_meta(lambda m: m.update(plan=5))
    return (lambda: load(target)), ["plan: Input should be a valid array, got 5"]


@case
def case_plan_is_a_string(ws):
    return ["analyze", ws.with_meta(lambda m: m.update(plan="prune")), "--no-latency"], ["plan: Input should be"]


@case
def case_version_is_a_string(ws):
    target = ws.with_meta(lambda m: m.update(version="2"))
    return (lambda: load(target)), ["version: Input should be a valid integer"]


@case
def case_version_from_the_future(ws):
    target = ws.with_meta(lambda m: m.update(version=99))
    return (lambda: load(target)), ["format version 99 is newer"]


@case
def case_tensors_is_a_list(ws):
    target = ws.with_meta(lambda m: m.update(tensors=[]))
    return (lambda: load(target)), ["tensors: Input should be an object"]


@case
def case_architecture_is_a_list(ws):
    target = ws.with_meta(lambda m: m.update(architecture=["zoo"]))
    return (lambda: load(target)), ["architecture: Input should be"]


@case
def case_metadata_without_format(ws):
    target = ws.with_meta(lambda m: m.pop("format"))
    return (lambda: load(target)), ['"format": "slimkit-model"']


@case
def case_metadata_is_not_json(ws):
    model = ws.model_dir()
    (model / "slimkit.json").write_text("{'format': oops")
    return ["analyze", model, "--no-latency"], ["slimkit.json: not valid JSON"]


@case
def case_metadata_nested_too_deeply(ws):
    model = ws.model_dir()
    (model / "slimkit.json").write_text("[" * 100_000 + "]" * 100_000)
    return (lambda: load(model)), ["slimkit.json"]


@case
def case_zoo_arguments_asking_for_a_huge_model(ws):
    model = ws.with_meta(lambda m: m.update(architecture={"zoo": "lenet300", "args": {"hidden": [100000, 100000]}}))
    return ["analyze", model, "--no-latency"], ["would have", "parameters", "at most"]


@case
def case_zoo_width_of_ten_to_the_five(ws):
    target = ws.with_meta(lambda m: m.update(architecture={"zoo": "lenet5", "args": {"width": 100000}}))
    return (lambda: load(target)), ["zoo model 'lenet5'", "46,08", "parameters"]


@case
def case_image_that_decompresses_to_gigapixels(ws):
    from PIL import Image

    for label in ("a", "b"):
        (ws.root / "imgs" / label).mkdir(parents=True)
        Image.new("1", (8, 8)).save(ws.root / "imgs" / label / "ok.png")
    Image.new("1", (20000, 20000)).save(ws.root / "imgs" / "a" / "bomb.png")  # 1 bit per pixel: a small file
    return ["train", "--model", "lenet300", "--data", ws.root / "imgs", "--out", ws.root / "o"], \
        ["bomb.png: not a readable image"]


@case
def case_factory_module_that_is_not_importable(ws):
    target = ws.with_meta(lambda m: m.update(architecture={"factory": "not_on_the_path:build", "args": {}}))
    return ["analyze", target, "--trust-code", "--no-latency"], ["cannot import module 'not_on_the_path'",
                                                                   "PYTHONPATH"]


@case
def case_zoo_arguments_of_the_wrong_type(ws):
    model = ws.with_meta(lambda m: m.update(architecture={"zoo": "lenet5", "args": {"width": "wide"}}))
    return (lambda: load(model)), ["zoo model 'lenet5': bad arguments"]


@case
def case_unknown_plan_op(ws):
    target = ws.with_meta(lambda m: m.update(plan=[{"op": "magic"}]))
    return (lambda: load(target)), ["unknown op 'magic'"]


def with_pruning_step(ws, size: int, keep: list[int], tensor: str = "fc1.weight") -> Path:
    """A model directory whose plan holds one channel group of ``size`` channels cut from ``tensor``."""
    group = {"size": size, "block": 1, "parts": 1, "keep": keep, "members": [[tensor, 0, 1, 0, "out", 1]]}
    return ws.with_meta(lambda m: m.update(plan=[{"op": "prune-channels", "method": "l1", "ratio": 0.5,
                                                  "groups": [group]}]))


@case
def case_plan_group_of_two_billion_channels(ws):
    target = with_pruning_step(ws, 2_000_000_000, [0])
    return (lambda: load(target)), ["plan[0].groups[0].size"]


@case
def case_plan_group_larger_than_its_layer(ws):
    target = with_pruning_step(ws, 5000, [0, 1])
    return (lambda: load(target)), ["fc1.weight has 300 entries"]


@case
def case_plan_keeping_channels_that_do_not_exist(ws):
    target = with_pruning_step(ws, 300, [0, 400])
    return (lambda: load(target)), ["keep must list increasing channel indices"]


@case
def case_plan_naming_a_missing_layer(ws):
    target = with_pruning_step(ws, 300, [0], tensor="nope.weight")
    return (lambda: load(target)), ["does not fit this architecture"]


@case
def case_factorization_of_a_billion_ranks(ws):
    step = {"op": "factorize", "layers": {"fc1": {"kind": "linear", "rank": 1_000_000_000}}}
    target = ws.with_meta(lambda m: m.update(plan=[step]))
    return (lambda: load(target)), ["exceeds its full rank 64"]


@case
def case_quantization_of_a_huge_input(ws):
    step = {"op": "quantize-static", "input_shape": [100000, 100000], "folded_batchnorm": [],
            "weights": {"fc1.weight": {"input": "x"}}, "activations": {}}
    target = ws.with_meta(lambda m: m.update(plan=[step]))
    return (lambda: load(target)), ["input_shape", "elements"]


@case
def case_encoding_shape_that_is_not_the_architectures(ws):
    def change(meta):
        meta["tensors"] = {"fc2.weight": {"encoding": "bitmask", "shape": [100, 3000]}}
    target = ws.with_meta(change)
    return (lambda: load(target)), ["'fc2.weight' has shape (100, 3000) in the file"]


@case
def case_encoding_of_two_to_the_forty_elements(ws):
    def change(meta):
        meta["tensors"] = {"fc2.weight": {"encoding": "indices", "shape": [1 << 20, 1 << 20]}}
    target = ws.with_meta(change)
    return (lambda: load(target)), ["tensors.fc2.weight", "elements"]


@case
def case_slim_stream_claiming_two_to_the_34_symbols(ws):
    def change(content):
        record = next(r for r in content["streams"] if r[5] != "raw")
        record[2], record[4] = [1 << 34], 1 << 34
    return ["unpack", ws.with_slim_header(change), "--out", ws.root / "u"], ["header cannot be read", "elements"]


@case
def case_slim_header_that_inflates_to_gigabytes(ws):
    blob = ws.slim().read_bytes()
    _, version, length, _ = struct.unpack_from("<4sHII", blob)
    header = zlib.compress(b'{"meta": {}, "streams": []' + b" " * (80 << 20) + b"}", 9)
    (ws.root / "bomb.slim").write_bytes(struct.pack("<4sHII", b"SLIM", version, len(header), zlib.crc32(header))
                                        + header)
    target = ws.root / "bomb.slim"
    return (lambda: load(target)), ["header cannot be read", "expands to more than"]


@case
def case_slim_stream_count_not_matching_its_shape(ws):
    def change(content):
        record = next(r for r in content["streams"] if r[5] != "raw")
        record[4] += 1000
    target = ws.with_slim_header(change)
    return (lambda: load(target)), ["header cannot be read", "declared for"]


# ---------------------------------------------------------------------------------------------- data

@case
def case_npz_that_is_not_a_zip(ws):
    (ws.root / "d.npz").write_bytes(b"hello")
    return ["train", "--model", "lenet300", "--data", ws.root / "d.npz", "--out", ws.root / "o"], ["not an .npz archive"]


@case
def case_npy_named_npz(ws):
    np.save(ws.root / "d.npy", np.zeros(3))
    os.rename(ws.root / "d.npy", ws.root / "d.npz")
    return ["analyze", ws.run_dir(), "--data", ws.root / "d.npz", "--no-latency"], ["not an .npz archive"]


@case
def case_npz_with_an_empty_split(ws):
    arrays = splits()
    arrays["x_val"], arrays["y_val"] = arrays["x_val"][:0], arrays["y_val"][:0]
    return ["train", "--model", "lenet300", "--data", ws.npz(**arrays), "--out", ws.root / "o"], ["x_val is empty"]


@case
def case_labels_beyond_the_models_classes(ws):
    return ["analyze", ws.run_dir(), "--data", ws.npz(**splits(n_classes=12)), "--no-latency"], \
        ["labels go up to 11", "10 outputs"]


@case
def case_labels_beyond_the_models_classes_when_training(ws):
    return ["train", "--model", "lenet5", "--data", ws.npz(**splits(n_classes=12)), "--out", ws.root / "o"], \
        ["labels go up to 11"]


@case
def case_inputs_of_the_wrong_shape(ws):
    return ["export", ws.run_dir(), "--data", ws.npz(**splits(side=16)), "--out", ws.root / "m.onnx"], \
        ["cannot run on this data", "[1, 16, 16]", "built for [1, 8, 8]"]


@case
def case_inputs_of_the_wrong_shape_in_a_recipe(ws):
    run = ws.run_dir()
    data = ws.npz(**splits(side=16))
    recipe = ws.recipe(f"model: {{path: {run}}}\ndata: {data}\nstages: [{{type: finetune, epochs: 1}}]\n")
    return ["run", recipe, "--out", ws.root / "o", "--no-progress"], ["cannot run on this data"]


@case
def case_a_label_of_ten_to_the_twelve(ws):
    arrays = splits()
    arrays["y_train"] = arrays["y_train"].astype(np.int64)
    arrays["y_train"][0] = 10 ** 12
    return ["train", "--model", "lenet300", "--data", ws.npz(**arrays), "--out", ws.root / "o"], ["class label"]


@case
def case_npz_of_pickled_objects(ws):
    arrays = splits()
    arrays["x_test"] = np.array([object()] * 12, dtype=object)
    return ["train", "--model", "lenet300", "--data", ws.npz(**arrays), "--out", ws.root / "o"], ["object arrays"]


# ---------------------------------------------------------------------------------------------- checkpoints

@case
def case_resume_from_a_damaged_checkpoint(ws):
    run = ws.run_dir()
    flip(run / "checkpoint" / "last.pt", 5000)
    return ["train", "--model", "lenet300", "--epochs", "9", "--out", run, "--resume", "--no-progress"], \
        ["last.pt: the checkpoint is damaged"]


@case
def case_resume_from_a_truncated_checkpoint(ws):
    run = ws.run_dir()
    ckpt = run / "checkpoint" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    return ["train", "--model", "lenet300", "--epochs", "9", "--out", run, "--resume", "--no-progress"], \
        ["last.pt"]


@case
def case_resume_another_architectures_checkpoint(ws):
    return ["train", "--model", "lenet5", "--epochs", "9", "--out", ws.run_dir(), "--resume", "--no-progress"], \
        ["cannot resume from this checkpoint", "does not fit"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@case
def case_resume_from_a_pickle_carrying_code(ws):
    run = ws.run_dir()
    (run / "checkpoint" / "last.pt").write_bytes(pickle.dumps({"model": Payload()}))
    return ["train", "--model", "lenet300", "--epochs", "9", "--out", run, "--resume", "--no-progress"], \
        ["refused as a checkpoint"]


# ---------------------------------------------------------------------------------------------- bounded work

@case
def case_a_thousand_threads(ws):
    return ["analyze", ws.run_dir(), "--threads", "1000"], ["--threads 1000", f"{available_cores()} core"]


@case
def case_a_recipe_asking_for_a_thousand_threads(ws):
    recipe = ws.recipe(f"model: {{path: {ws.run_dir()}}}\nevaluate: {{threads: 1000}}\n")
    return ["run", recipe, "--out", ws.root / "o"], ["evaluate.threads 1000"]


@case
def case_yaml_alias_bomb(ws):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]")
    lines.append("model: {zoo: lenet300}\nname: *i")
    return ["run", ws.recipe("\n".join(lines)), "--out", ws.root / "o"], ["through YAML aliases"]


@case
def case_recursive_yaml_alias(ws):
    return ["run", ws.recipe("model: &m {zoo: lenet300, args: *m}\n"), "--out", ws.root / "o"], ["refers to itself"]


@case
def case_recipe_nested_too_deeply(ws):
    return ["run", ws.recipe("a: " + "[" * 50_000 + "]" * 50_000), "--out", ws.root / "o"], ["r.yaml"]


@case
def case_recipe_of_two_megabytes(ws):
    return ["run", ws.recipe("# " + "x" * (2 << 20) + "\nmodel: {zoo: lenet300}\n"), "--out", ws.root / "o"], \
        ["bytes; a recipe may have at most"]


@case
def case_recipe_stage_type_that_is_a_list(ws):
    return ["run", ws.recipe("model: {zoo: lenet300}\nstages: [{type: [prune]}]\n"), "--out", ws.root / "o"], \
        ["stages[0].type: unknown stage type"]


@case
def case_recipe_echoing_a_huge_value(ws):
    return ["run", ws.recipe(f"model: {{zoo: lenet300}}\nseed: '{'9' * 100_000}'\n"), "--out", ws.root / "o"], \
        ["seed: Input should be a valid integer", "..."]


# ---------------------------------------------------------------------------------------------- unwritable

def _failing(call: str, code: int):
    """Patch the file-system ``call`` the atomic writers use to fail with ``code`` (as a full or read-only disk
    would), for the duration of one API call."""
    def run(action):
        import slimkit.io as sio

        original = getattr(sio.os, call)

        def fail(*args, **kwargs):
            raise OSError(code, os.strerror(code))

        setattr(sio.os, call, fail)
        try:
            action()
        finally:
            setattr(sio.os, call, original)
    return run


@case
def case_disk_full_while_saving(ws):
    model = load(ws.model_dir())
    return (lambda: _failing("replace", errno.ENOSPC)(lambda: save(model, ws.root / "new"))), \
        ["cannot write", "No space left on device", "nothing was written"]


@case
def case_read_only_file_system_while_packing(ws):
    source = ws.model_dir()
    return (lambda: _failing("replace", errno.EROFS)(lambda: pack(source, ws.root / "p.slim"))), \
        ["Read-only file system"]


@case
def case_permission_denied_while_unpacking(ws):
    slim = ws.slim()
    return (lambda: _failing("replace", errno.EACCES)(lambda: unpack(slim, ws.root / "u"))), ["Permission denied"]


# ---------------------------------------------------------------------------------------------- the battery

@pytest.fixture
def workspace(tmp_path, trained_run):
    ws = Workspace(tmp_path / "ws", trained_run)
    ws.root.mkdir()
    ws.cleanup = []
    yield ws
    for fn in ws.cleanup:
        fn()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_named_error_and_nothing_is_lost(name, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace.root)  # a payload that ran would leave "pwned" here
    action, fragments = CASES[name](workspace)
    before = snapshot(workspace.root)
    capsys.readouterr()
    if callable(action):
        with pytest.raises(SlimkitError) as info:
            action()
        message = str(info.value)
    else:
        code = main([str(a) for a in action])
        captured = capsys.readouterr()
        message = captured.err
        assert code == 2, message
        assert message.startswith("error: ") and "Traceback" not in captured.err + captured.out
    assert "internal error" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert len(message) < 3000  # readable: values are echoed cut short
    assert snapshot(workspace.root) == before  # inputs unchanged, no partial output, no temporary or lock file


def test_the_battery_is_broad():
    assert len(CASES) >= 60


# ---------------------------------------------------------------------------------------------- damage and fuzzing

def test_a_bit_flip_anywhere_in_the_weights_is_reported_as_damage(tmp_path):
    ws = Workspace(tmp_path, trained_run=None)
    weights = ws.model_dir() / "model.safetensors"
    original = weights.read_bytes()
    offsets = sorted({*range(0, 200), *np.linspace(0, len(original) - 1, 400).astype(int).tolist()})
    for offset in offsets:
        damaged = bytearray(original)
        damaged[offset] ^= 1 << (offset % 8)
        weights.write_bytes(bytes(damaged))
        with pytest.raises(SlimkitError, match="model.safetensors is damaged"):
            load(weights.parent)
    weights.write_bytes(original)
    load(weights.parent)


def _mutations(blob: bytes, rng: np.random.Generator, count: int):
    """Seeded damage of every kind: bit flips, random bytes, truncation, insertion, deleted ranges."""
    for _ in range(count):
        data = bytearray(blob)
        kind = rng.integers(5)
        at = int(rng.integers(len(data)))
        if kind == 0:
            data[at] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            data[at] = int(rng.integers(256))
        elif kind == 2:
            del data[at:]
        elif kind == 3:
            data[at:at] = rng.integers(256, size=int(rng.integers(1, 9))).astype(np.uint8).tobytes()
        else:
            del data[at:at + int(rng.integers(1, 33))]
        yield bytes(data)


def test_fuzzed_model_files_are_named_errors_or_load_identically(tmp_path):
    """Every mutation of a model directory's two files, and of a .slim file, is either a SlimkitError or (a
    harmless change, such as a metadata field nothing reads) loads to outputs identical to the original's."""
    ws = Workspace(tmp_path, trained_run=None)
    folder, slim = ws.model_dir(), ws.slim()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = load(folder)(x)
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "identical": 0}
    targets = [(folder / "model.safetensors", folder), (folder / "slimkit.json", folder), (slim, slim)]
    for file, loaded in targets:
        original = file.read_bytes()
        for mutated in _mutations(original, rng, 150):
            file.write_bytes(mutated)
            try:
                model = load(loaded)
            except SlimkitError:
                outcomes["error"] += 1
                continue
            with torch.no_grad():
                assert torch.equal(model(x), reference), (file.name, len(mutated))
            outcomes["identical"] += 1
        file.write_bytes(original)
    assert outcomes["error"] > 400 and sum(outcomes.values()) == 450
