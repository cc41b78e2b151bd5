"""The compression passes, one module each.

Every pass takes an ``onnx.ModelProto`` and returns a
:class:`~host_tools.compress.pass_manager.PassResult`; the pass manager runs and measures
them, and :mod:`host_tools.compress.recipe` names them:

- :mod:`.quantize`: int8 static and dynamic, fp16, int4 weight-only (onnxruntime's quantizer)
- :mod:`.accuracy_guard`: keeps a quantization's most sensitive nodes in float within a quality budget
- :mod:`.prune`: magnitude and sensitivity pruning (zeros in place)
- :mod:`.structured`: channel pruning (the dense model shrinks)
- :mod:`.lowrank`: SVD factorization of large layers
- :mod:`.decompose`: ``Gemm`` into ``MatMul`` + ``Add`` (for the dynamic quantizer)
- :mod:`.weight_sharing`: shared weight values, and the packed transport form
- :mod:`.finetune`, :mod:`.distill`: the passes that train (the training itself is in
  :mod:`host_tools.compress.training`)
"""
