"""Export to deployment runtimes and run exported models."""

from .layer_diff import first_divergence, int8_layer_diff
from .onnx import ExportResult, export_onnx, onnx_bytes, ort_session, run_ort

__all__ = ["ExportResult", "export_onnx", "first_divergence", "int8_layer_diff", "onnx_bytes", "ort_session", "run_ort"]
