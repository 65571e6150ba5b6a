import os

# Every compiled kernel fills its outputs with NaN first, so an unwritten element fails parity.
os.environ.setdefault("CONVNEXT_FAST_POISON_OUTPUTS", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A distinct, reproducible seed per test: inputs differ across tests but a failure replays.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
