"""Training for the passes that train (fine-tuning, distillation), in torch.

- :mod:`.torch_bridge`: an ONNX graph as a trainable torch module and back
- :mod:`.loop`: the training loop, masks for pruned weights, ties for shared weights
- :mod:`.distill`: the teacher's soft targets, the student as a module, the distillation loss

torch is optional (``pip install 'edge-sdk[train]'``): these modules import it only when
training runs, so importing them is light.
"""
