"""Compression of ``.tflite`` models: ai-edge-quantizer, measured in LiteRT.

:mod:`.quantize` holds the modes (``int8-static``, ``int8-dynamic``...) and
:func:`~host_tools.compress.tflite.quantize.compress_tflite`. It works on ``.tflite``
bytes, not ONNX, so it is not a pass of the pass manager.
"""
