"""A GPU device of ggml's registry against the CPU: the same model, the same windows of the evaluation text,
teacher-forced, every weight on the device (`--gpu NAME`, no budget) or none.

    python benchmarks/gpu_parity.py Vulkan0 [--windows 4] [--ctx 256]
    GGML_VK_VISIBLE_DEVICES=0 python benchmarks/gpu_parity.py Vulkan0   # Mesa's software driver (lavapipe)

Needs a GPU build of llama-cpp-python (`make gpu`). Prints, per real model: perplexity on each, top-1 agreement,
the largest logit difference, and the CPU's margin between its top two tokens where the top-1 differs (small:
near-ties), and the seconds each side took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edge.engine import Engine
from edge.evaluate import eval_text, token_nll, windows
from edge.models import default_model_path, gemma3_270m_path
from edge.strategies import Options


def logits_over(path, device: str, n: int, ctx: int) -> tuple[list, list, float]:
    engine = Engine(path, n_ctx=ctx, threads=2, options=Options(gpu=device))
    tok = engine.tokenizer
    wins = windows(tok.encode(eval_text(), add_bos=False), ctx, n, tok.bos_id if tok.add_bos else None)
    t = time.perf_counter()
    out = [engine.model.forward(np.array(w, np.int64), 0, all_logits=True) for w in wins]
    return out, wins, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("device", help="a device `edge info` lists (Vulkan0, CUDA0, MTL0)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    args = ap.parse_args()
    for name, path in (("SmolLM2-135M", default_model_path()), ("Gemma-3-270M", gemma3_270m_path())):
        cpu, wins, t_cpu = logits_over(path, "", args.windows, args.ctx)
        gpu, _, t_gpu = logits_over(path, args.device, args.windows, args.ctx)
        nll = [np.concatenate([token_nll(v, w) for v, w in zip(side, wins)]) for side in (cpu, gpu)]
        ppl = [float(np.exp(x.mean())) for x in nll]
        agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(cpu, gpu)])
        margins = [float(np.diff(np.sort(a[i])[-2:])[0]) for a, b in zip(cpu, gpu)
                   for i in np.flatnonzero(a.argmax(-1) != b.argmax(-1))]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(cpu, gpu))
        print(f"{name}: {len(nll[0])} tokens; perplexity CPU {ppl[0]:.4f}, {args.device} {ppl[1]:.4f} "
              f"({100 * (ppl[1] / ppl[0] - 1):+.2f}%); top-1 agreement {agree.mean():.4f}; largest logit "
              f"difference {diff:.3f}; CPU's top-two margin where top-1 differs: max {max(margins, default=0):.3f}, "
              f"median {float(np.median(margins)) if margins else 0:.3f}; seconds CPU {t_cpu:.1f}, "
              f"{args.device} {t_gpu:.1f}", flush=True)


if __name__ == "__main__":
    main()
