import torch, triton, triton.testing, sys, time
from torch_mosa.ops.mosa import triton_mosa as tm
sys.path.insert(0, "benchmarks")
from profile_mosa_kernels import SHAPES, random_selection, profile_layer
dev = torch.device("cuda"); dt = torch.bfloat16
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
for case in ("A", "B", "C"):
    batch, seq_len, hidden, heads, k = SHAPES[case]
    x = torch.randn(batch, seq_len, hidden, device=dev, dtype=dt)
    w_qkv = (torch.randn(heads, hidden, 192, device=dev) / hidden ** 0.5).to(dt)
    w_o = (torch.randn(heads, 64, hidden, device=dev) / 8).to(dt)
    indices, scores = random_selection(batch, seq_len, heads, k, dev)
    dy = torch.randn_like(x)
    for tf in (False, True):
        tm.TILES_FASTEST = tf
        y, o = tm.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4)
        fwd = triton.testing.do_bench(lambda: tm.mosa_fwd(x, w_qkv, w_o, indices, scores, 32, 1e4), return_mode="median")
        bwd = triton.testing.do_bench(lambda: tm.mosa_bwd(dy, x, w_qkv, w_o, indices, scores, o, 32, 1e4), return_mode="median")
        print(f"{case} tiles_fastest={tf}: fwd {fwd:.3f} bwd {bwd:.3f}", flush=True)
    tm.TILES_FASTEST = False
    # pieces
    xf = x.view(-1, hidden); wr = torch.randn(heads, hidden, device=dev, dtype=dt)
    t_r = triton.testing.do_bench(lambda: xf @ wr.t(), return_mode="median")
    try:
        t_r32 = triton.testing.do_bench(lambda: torch.mm(xf, wr.t(), out_dtype=torch.float32), return_mode="median")
    except Exception as e:
        t_r32 = float('nan'); print("mm out_dtype failed", e)
    xb = x
    t_rE = triton.testing.do_bench(lambda: torch.matmul(wr, xb.transpose(1, 2)), return_mode="median")
    logits = torch.randn(batch, heads, seq_len, device=dev)
    t_topk = triton.testing.do_bench(lambda: logits.topk(k, dim=-1).indices.sort(dim=-1), return_mode="median")
    # zero fill of fp32 accumulator + cast
    acc = torch.empty(batch * seq_len, hidden, device=dev)
    t_zero = triton.testing.do_bench(lambda: acc.zero_(), return_mode="median")
    t_cast = triton.testing.do_bench(lambda: acc.to(dt), return_mode="median")
    print(f"{case} pieces ms: router bf16 {t_r:.3f} | router fp32-out {t_r32:.3f} | router E-major {t_rE:.3f} | topk+sort {t_topk:.3f} | zero acc {t_zero:.3f} | cast acc {t_cast:.3f}", flush=True)
profile_layer("A")
