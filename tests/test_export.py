import numpy as np
import onnx
import pytest
import torch

from slimkit import SlimkitError, ZOO, export_onnx, new_model
from slimkit.export import ort_session, run_ort
from slimkit.export import onnx as onnx_module


@pytest.mark.parametrize("name", list(ZOO))
def test_export_matches_torch_with_dynamic_batch(tmp_path, digits, name):
    torch.manual_seed(0)
    model = new_model(name).eval()
    path = tmp_path / f"{name}.onnx"
    result = export_onnx(model, path, digits.x_test[:2], verify_on=digits.x_test)
    assert result.max_abs_diff <= 1e-4 and result.samples_checked == 360
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension
    session = ort_session(path)
    for batch in (1, 7):
        x = digits.x_test[:batch]
        with torch.no_grad():
            np.testing.assert_allclose(run_ort(session, x), model(x).numpy(), atol=1e-4)


def test_mismatching_export_is_refused_and_not_written(tmp_path, digits, monkeypatch):
    model = new_model("lenet300").eval()
    real_export = onnx_module._export_graph

    def export_other_weights(m, path, sample, opset):
        other = new_model("lenet300").eval()
        with torch.no_grad():
            other.fc3.bias += 1.0
        real_export(other, path, sample, opset)

    monkeypatch.setattr(onnx_module, "_export_graph", export_other_weights)
    with pytest.raises(SlimkitError, match="does not match torch"):
        export_onnx(model, tmp_path / "m.onnx", digits.x_test[:2], verify_on=digits.x_test)
    assert list(tmp_path.iterdir()) == []


def test_unexportable_model_is_a_clear_error(tmp_path):
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if float(x.sum()) > 0 else x  # a Python branch on tensor data

    with pytest.raises(SlimkitError, match="ONNX export failed for DataDependent"):
        export_onnx(DataDependent(), tmp_path / "x.onnx", torch.randn(2, 3))
    assert not (tmp_path / "x.onnx").exists()


def test_weights_over_the_protobuf_limit_go_to_a_side_file(tmp_path, digits, monkeypatch):
    """A model too large for one protobuf (2 GiB) keeps its weights in NAME.onnx.data; exercised on a small
    model by lowering the threshold. Both files appear only when verified, and a user's file is never replaced."""
    from slimkit.export.onnx import onnx_bytes
    from slimkit.export.qdq import export_int8_verified
    from slimkit.quant.ptq import StaticQuantConfig, quantize_static

    monkeypatch.setattr(onnx_module, "EXTERNAL_DATA_BYTES", 0)
    model = new_model("lenet5").eval()
    out = tmp_path / "fp32.onnx"
    export_onnx(model, out, digits.x_test[:2], verify_on=digits.x_test[:64])
    export_onnx(model, out, digits.x_test[:2], verify_on=digits.x_test[:64])  # replaces its own pair
    quantized, _ = quantize_static(model, digits.x_train[:256], StaticQuantConfig())
    export_int8_verified(quantized, tmp_path / "int8.onnx", digits.x_test[:64], reference=model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "fp32.onnx.data", "int8.onnx", "int8.onnx.data"]
    weights = sum(p.numel() for p in model.parameters())
    side_bytes = (tmp_path / "fp32.onnx.data").stat().st_size  # every tensor of 1 KiB or more: ~all the weights
    assert 0.95 * 4 * weights < side_bytes <= 4 * weights and out.stat().st_size < 0.1 * side_bytes
    assert onnx_bytes(out) == out.stat().st_size + (tmp_path / "fp32.onnx.data").stat().st_size
    locations = {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"fp32.onnx.data"}

    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("fp32.onnx", "fp32.onnx.data"):
        (tmp_path / name).rename(moved / name)
    with torch.no_grad():
        expected = model(digits.x_test[:8]).numpy()
    np.testing.assert_allclose(run_ort(ort_session(moved / "fp32.onnx"), digits.x_test[:8]), expected, atol=1e-4)

    (tmp_path / "user.onnx.data").write_bytes(b"not slimkit's")
    with pytest.raises(SlimkitError, match="user.onnx.data already exists and slimkit did not write it"):
        export_onnx(model, tmp_path / "user.onnx", digits.x_test[:2])
    assert (tmp_path / "user.onnx.data").read_bytes() == b"not slimkit's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx", "int8.onnx.data", "moved", "user.onnx.data"]
