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
