import sys, torch, triton.testing
sys.path.insert(0, "benchmarks")
from profile_mosa_kernels import profile_layer
from torch_mosa.bench.cases import CASES, _layers, case_inputs
torch.backends.cuda.matmul.allow_tf32 = False
# determinism probe: same input twice through the layer
case = CASES["A"][0]
mosa, _ = _layers(case, torch.device("cuda"))
x, g = case_inputs(case, "cuda")
outs = []
for _ in range(2):
    y = mosa(x); y.backward(g)
    outs.append((y.detach().clone(), x.grad.clone())); x.grad = None
print("determinism A: y bitwise equal", torch.equal(outs[0][0], outs[1][0]), "dx bitwise equal", torch.equal(outs[0][1], outs[1][1]),
      "y max diff", (outs[0][0].float() - outs[1][0].float()).abs().max().item())
del mosa, x, g, outs
torch.cuda.empty_cache()
profile_layer("A")
profile_layer("C")
