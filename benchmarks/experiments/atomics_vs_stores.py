"""How much of the op's time are the fp32 atomics? Time the forward / backward kernels as they are and with the
atomic scatter-adds replaced by plain stores (wrong results; timing only)."""
import importlib.util, sys, pathlib, torch, triton, triton.testing
sys.path.insert(0, "benchmarks")
from profile_mosa_kernels import SHAPES, random_selection
from torch_mosa.ops.mosa import triton_mosa as tm

src = pathlib.Path(tm.__file__).read_text()
fwd_atomic = 'tl.atomic_add(y_ptr + dest[:, None] * H + hs[None, :], out, mask=keep[:, None] & hm[None, :], sem="relaxed")'
bwd_atomic = """tl.atomic_add(dx_ptr + dest[:, None] * H + hs[None, :], dx, mask=row_ok[:, None] & hm[None, :],
                      sem="relaxed")"""
assert fwd_atomic in src and bwd_atomic in src
variant = (src.replace(fwd_atomic, 'tl.store(y_ptr + dest[:, None] * H + hs[None, :], out, mask=keep[:, None] & hm[None, :])')
              .replace(bwd_atomic, 'tl.store(dx_ptr + dest[:, None] * H + hs[None, :], dx, mask=row_ok[:, None] & hm[None, :])')
              .replace('"torch_mosa::mosa_attention_fwd"', '"torch_mosa_exp::fwd"').replace('"torch_mosa::mosa_attention_bwd"', '"torch_mosa_exp::bwd"'))
path = pathlib.Path("/tmp/tm_store.py"); path.write_text(variant)
spec = importlib.util.spec_from_file_location("tm_store", path); ts = importlib.util.module_from_spec(spec); spec.loader.exec_module(ts)
dev, dt = torch.device("cuda"), torch.bfloat16
for case in ("A", "B", "C"):
    batch, seq_len, hidden, heads, k = SHAPES[case]
    x = torch.randn(batch, seq_len, hidden, device=dev, dtype=dt)
    w_qkv = (torch.randn(heads, hidden, 192, device=dev) / hidden ** 0.5).to(dt)
    w_o = (torch.randn(heads, 64, hidden, device=dev) / 8).to(dt)
    w_r = (torch.randn(heads, hidden, device=dev) / hidden ** 0.5).to(dt)
    indices, scores = random_selection(batch, seq_len, heads, k, dev)
    dy = torch.randn_like(x)
    for name, mod in (("atomic", tm), ("store", ts)):
        y, o = mod.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4)
        fwd = triton.testing.do_bench(lambda: mod.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4), return_mode="median")
        bwd = triton.testing.do_bench(lambda: mod.mosa_bwd(dy, x, w_qkv, w_o, w_r, indices, scores, o, 32, 1e4), return_mode="median")
        print(f"{case} {name:>6}: fwd {fwd:.3f} ms  bwd {bwd:.3f} ms", flush=True)
