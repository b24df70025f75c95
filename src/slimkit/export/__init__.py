"""Export to deployment runtimes and run exported models."""

from .onnx import ExportResult, export_onnx, ort_session, run_ort

__all__ = ["ExportResult", "export_onnx", "ort_session", "run_ort"]
