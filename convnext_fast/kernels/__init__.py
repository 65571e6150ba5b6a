"""Triton kernels and their launchers.

One module per fused op (``dwconv_ln``, ``mlp``, ``mlp_grn``) and what they share: ``runtime``
(interpreter or GPU, autotuning, tile sizes) and ``gemm`` (GELU and the GEMM pieces of the MLP
kernels). Launchers take and return tensors and do no backend dispatch; the ``triton`` backend
wraps them as ``torch.library.triton_op``. Importing a submodule imports triton;
``TRITON_INTERPRET=1`` must be set before that to run the kernels on CPU under the interpreter.
"""
