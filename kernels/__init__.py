"""Triton kernels and their launchers (installed as ``convnext_fast.kernels``).

One module per fused op (``dwconv_ln``, ...). Launchers take and return tensors and do no backend
dispatch; the ``triton`` backend in ``convnext_fast.ops`` wraps them as ``torch.library.triton_op``.
Importing a submodule imports triton; ``TRITON_INTERPRET=1`` must be set before that to run the
kernels on CPU under the Triton interpreter.
"""
