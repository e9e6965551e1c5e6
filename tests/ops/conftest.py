import pytest


@pytest.fixture(params=[(False, False), (True, False), (True, True)],
                ids=["fused", "split", "split-output-kernel-weights-split"])
def mosa_kernel_path(request, monkeypatch):
    """Runs a test through every form of the MoSA kernels: the fused row kernels, the split path
    (`triton_mosa.SPLIT_PROJECTION`: the projections as grouped GEMM kernels of their own), and the split path with
    the variants not yet on by default: the forward's output projection in a kernel of its own
    (`triton_mosa.SPLIT_OUTPUT_KERNEL`) and the weight gradients in two launches (`triton_mosa.WEIGHTS_SPLIT`, 16-bit
    inputs). Returns whether the path is split. Imported here, not at the top: Triton is optional (README), and the
    tests that use this fixture skip without it."""
    from torch_mosa.ops.mosa import triton_mosa

    split, variants = request.param
    monkeypatch.setattr(triton_mosa, "SPLIT_PROJECTION", split)
    monkeypatch.setattr(triton_mosa, "SPLIT_OUTPUT_KERNEL", variants)
    monkeypatch.setattr(triton_mosa, "WEIGHTS_SPLIT", variants)
    return split
