import os

# Every compiled kernel fills its outputs with NaN first, so an unwritten element fails parity.
os.environ.setdefault("CONVNEXT_FAST_POISON_OUTPUTS", "1")

import torch  # noqa: E402  (importing torch does not import triton)

# Without a GPU the Triton kernels run on the interpreter. It must be on before anything (timm
# included) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A distinct, reproducible seed per test: inputs differ across tests but a failure replays.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def replace_backend():
    """``replace_backend(op, backend, fn=..., available=..., supports=...)``: swap parts of a
    registered implementation for one test (through the public registry), restored afterwards."""
    import dataclasses

    from convnext_fast import backends

    saved = []

    def replace(op: str, backend: str, **fields):
        old = backends.registered(op)[backend]
        backends.register(op, backend, dataclasses.replace(old, **fields))
        saved.append((op, backend, old))

    yield replace
    for op, backend, old in reversed(saved):
        backends.register(op, backend, old)
