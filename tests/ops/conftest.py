import pytest


@pytest.fixture(params=[(False, False), (True, False), (True, True)], ids=["fused", "split", "split-output-kernel"])
def mosa_kernel_path(request, monkeypatch):
    """Runs a test through every form of the MoSA kernels: the fused row kernels, the split path
    (`triton_mosa.SPLIT_PROJECTION`: the projections as grouped GEMM kernels of their own), and the split path whose
    forward projects the attention output in a kernel of its own (`triton_mosa.SPLIT_OUTPUT_KERNEL`). Returns
    whether the path is split. Imported here, not at the top: Triton is optional (README), and the tests that use
    this fixture skip without it."""
    from torch_mosa.ops.mosa import triton_mosa

    split, output_kernel = request.param
    monkeypatch.setattr(triton_mosa, "SPLIT_PROJECTION", split)
    monkeypatch.setattr(triton_mosa, "SPLIT_OUTPUT_KERNEL", output_kernel)
    return split
