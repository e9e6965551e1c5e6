import sys, torch, traceback
from torch_mosa.bench import TRAIN_MODELS, train_step_tokens_per_second
from torch_mosa.bench.report import markdown_report
compile_model = "--no-compile" not in sys.argv
rows = []
for name, kw in TRAIN_MODELS.items():
    try:
        rate, mib = train_step_tokens_per_second(kw, batch=64, compile_model=compile_model)
    except Exception as e:
        traceback.print_exc(limit=3)
        print(f"{name}: compiled step failed ({type(e).__name__}); timing eager", flush=True)
        torch.cuda.empty_cache()
        rate, mib = train_step_tokens_per_second(kw, batch=64, compile_model=False)
        name += " (eager)"
    rows.append((name, 64, rate, mib))
    print(f"train step {name}: {rate:,.0f} tokens/s, {mib:.0f} MiB", flush=True)
print(markdown_report([], rows, command="PYTHONPATH=src python -m torch_mosa.bench --cases ... --train-step (models: bench.TRAIN_MODELS, B=64, compiled)"))
