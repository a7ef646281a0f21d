"""Deployment: a fitted model as one scorer graph (ONNX / OpenVINO) and a runtime without torch.

- :mod:`.exporter`: :func:`export_model` (needs torch and ``onnx``; ``openvino`` for OpenVINO).
- :mod:`.runtime`: :class:`~.runtime.Scorer`, numpy + Pillow + onnxruntime (or openvino) only;
  a copy of it travels with every export as ``padim_runtime.py``.
"""
