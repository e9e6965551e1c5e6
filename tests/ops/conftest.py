import pytest


@pytest.fixture(params=[False, True], ids=["fused", "split"])
def mosa_kernel_path(request, monkeypatch):
    """Runs a test through both forms of the MoSA kernels: the fused row kernels, and the split path
    (`triton_mosa.SPLIT_PROJECTION`: the projections as grouped GEMM kernels of their own). Imported here, not at
    the top: Triton is optional (README), and the tests that use this fixture skip without it."""
    from torch_mosa.ops.mosa import triton_mosa

    monkeypatch.setattr(triton_mosa, "SPLIT_PROJECTION", request.param)
    return request.param
