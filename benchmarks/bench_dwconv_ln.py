"""dwconv_ln per backend vs eager PyTorch (cuDNN/ATen depthwise conv + LayerNorm) and torch.compile
of it, forward and forward+backward, at the ConvNeXt-T stage shapes; bytes counted for GB/s.
The cases (stage, dtype, provider, mode) are parametrised by conftest.py."""


def test_dwconv_ln(op_case, stage, dtype, provider, mode):
    op_case("dwconv_ln", stage, dtype, provider, mode)
