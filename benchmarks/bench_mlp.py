"""mlp (V1) and mlp_grn (V2) per backend vs eager PyTorch and torch.compile of it, forward and
forward+backward, at the ConvNeXt-T stage shapes; FLOPs and bytes counted by
convnext_fast.bench.op_cost. The cases (stage, dtype, provider, op_name, mode) are parametrised by
conftest.py."""

OP_NAMES = ["mlp", "mlp_grn"]


def test_mlp(op_case, stage, dtype, provider, op_name, mode):
    op_case(op_name, stage, dtype, provider, mode)
