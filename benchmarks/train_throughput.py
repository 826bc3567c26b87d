"""Training throughput of our transformer vs the reference ICL setup (Garg et al. 2022) on GPT2Model.

Both models: same width, depth, heads and context length, batch 64, AdamW, one
training step = forward + MSE over every prefix prediction + backward + clip +
step. The reference is Hugging Face ``GPT2Model`` (built from a ``GPT2Config``,
no weight download) fed the interleaved sequence ``x_0, y_0, x_1, ..., x_n``
through a linear read-in, read out at the x tokens: ``n + 1`` prefix predictions
per prompt, the same number as ours. The two are timed in alternating blocks
(A B A B ...) so machine load hits both alike; the median block rate is reported.

    .venv/bin/python benchmarks/train_throughput.py --preset quick --threads 1

Needs the ``bench`` extra (``pip install -e .[bench]`` for ``transformers``).

``--gflops`` (issue 17) measures the achieved rate of the package's own training step
(``training.train_step`` on a ``One``: forward, loss, backward, clip, AdamW, with fresh prompts as
the loop samples them), its FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls
and attention, forward and backward), against a loop of the step's largest matmul shape
(``(batch x tokens) x D -> 3D``, the QKV projection) in alternating blocks; ``--profile`` adds
the operator table of a few steps (where the time goes)::

    .venv/bin/python benchmarks/train_throughput.py --gflops --preset quick [--set model.mlp=true]

``--stacked`` measures something else: model-steps per second of a sweep trained
as one stack (``icl_heads.training.train_stack``) vs the same models trained one at a time,
on one device in one run (alternating blocks again). Members: every head count
of the preset x ``--seeds`` seeds (default: quick 4 seeds x heads {1, 2, 4} =
12 models; paper 1 seed x heads {1, 2, 4, 8}); steps at the end of the
schedule (full n, curriculum done)::

    .venv/bin/python benchmarks/train_throughput.py --stacked --preset quick [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from icl_heads.config import get_preset
from icl_heads.model import Transformer
from icl_heads.tasks import generator, sample_prompts


class GPT2Reference(nn.Module):
    """Garg et al.'s ``TransformerModel``: interleaved tokens, GPT2Model backbone, read-out at x tokens."""

    def __init__(self, d: int, n_examples: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        cfg = GPT2Config(n_positions=2 * n_examples, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                         vocab_size=1, bos_token_id=0, eos_token_id=0)  # token embeddings unused (inputs_embeds)
        self.read_in = nn.Linear(d + 1, d_model)
        self.backbone = GPT2Model(cfg)
        self.read_out = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        xs = torch.cat([x, torch.zeros(B, N, 1, dtype=x.dtype)], -1)
        ys = torch.cat([torch.zeros_like(x), y[..., None]], -1)
        z = torch.stack([xs, ys], 2).reshape(B, 2 * N, d + 1)[:, : 2 * N - 1]
        h = self.backbone(inputs_embeds=self.read_in(z)).last_hidden_state
        return self.read_out(h[:, ::2]).squeeze(-1)


def step_fn(model: nn.Module, task, batch: int) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = generator(0, "train")

    def step() -> None:
        p = sample_prompts(task, batch, gen)
        loss = F.mse_loss(model(p.x, p.y), p.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def step_gflops(a: argparse.Namespace) -> None:
    """Achieved GFLOP/s of the training step vs a same-shape matmul loop, measured in the same run."""
    from torch.utils.flop_counter import FlopCounterMode

    from icl_heads.config import with_overrides
    from icl_heads.training import One, lr_at, optimizer_for, train_prompts, train_step

    p = get_preset(a.preset)
    if a.set:
        p = with_overrides(p, **dict(kv.split("=", 1) for kv in a.set))
    torch.manual_seed(0)
    model = Transformer(p.model_config_for(a.heads))
    one, cfg, task = One(model), p.train, p.task
    opt, gen, k = optimizer_for(one, cfg), generator(0, "train"), p.train.steps - 1

    def step() -> None:
        q = train_prompts(task, cfg.batch_size, gen, task.n_max, task.d)
        train_step(one, opt, (q.x, q.y, {}), lr_at(k, cfg), cfg.grad_clip)

    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    tokens = model.token_layout(task.n_max + 1, torch.device("cpu"))[1].shape[0]
    D = model.cfg.d_model
    A, W = torch.randn(cfg.batch_size * tokens, D), torch.randn(3 * D, D)
    mm_flops = 2 * A.shape[0] * D * 3 * D
    rates: dict[str, list[float]] = {"training step": [], "matmul": []}
    for _ in range(a.blocks):
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        rates["training step"].append(a.steps * flops / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        for _ in range(a.steps * 20):
            F.linear(A, W)
        rates["matmul"].append(a.steps * 20 * mm_flops / (time.perf_counter() - t) / 1e9)
    med = {k: statistics.median(v) for k, v in rates.items()}
    c = model.cfg
    print(f"preset={a.preset} L={c.n_layers} D={D} h={c.n_heads} mlp={c.mlp} tokens={c.token_format} "
          f"batch={cfg.batch_size} x {tokens} tokens; threads={torch.get_num_threads()}; "
          f"{flops / 1e9:.3f} GFLOP per step (FlopCounterMode); median of {a.blocks} alternating blocks")
    print(f"  training step {med['training step']:6.1f} GFLOP/s ({med['training step'] * 1e9 / flops:.1f} steps/s)")
    print(f"  matmul {A.shape[0]}x{D}x{3 * D}  {med['matmul']:6.1f} GFLOP/s")
    print(f"ratio step / matmul: {med['training step'] / med['matmul']:.0%} (issue 17 target: >= 60%)")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def stacked_vs_separate(a: argparse.Namespace) -> None:
    """Model-steps/s of one stack vs the same members one at a time (each as ``training.train`` steps)."""
    from pathlib import Path

    from icl_heads.training import One, Stack, cuda_fast_math, init_stack, members_for, optimizer_for, stack_step
    from icl_heads.training import lr_at, train_prompts, train_step

    p = get_preset(a.preset)
    seeds = a.seeds or (4 if a.preset != "paper" else 1)
    members = members_for(p, p.heads, range(seeds), lambda s, h: Path("unused"))
    cfg, task, dev, k = p.train, p.task, a.device, p.train.steps - 1
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    stack, gens, which = init_stack(members, dev)
    sopt = optimizer_for(Stack(stack), cfg, dev)
    singles = []
    for m in members:
        one, g, _ = init_stack([m], dev)
        model = one.member(0)
        singles.append((One(model), optimizer_for(One(model), cfg, dev), next(iter(g.values()))))

    def stacked() -> None:
        stack_step(stack, stack, sopt, gens, which, cfg, task, k)

    def separate() -> None:
        for one, opt, gen in singles:  # the step of training.train's loop
            q = train_prompts(task, cfg.batch_size, gen, task.n_max, task.d)
            train_step(one, opt, (q.x, q.y, {}), lr_at(k, cfg), cfg.grad_clip)

    M, rates = len(members), {"stacked": [], "separate": []}
    with cuda_fast_math(dev):
        for fn in (stacked, separate):  # warm-up
            for _ in range(2):
                fn()
        sync()
        for _ in range(a.blocks):
            for name, fn in (("stacked", stacked), ("separate", separate)):
                t = time.perf_counter()
                for _ in range(a.steps):
                    fn()
                sync()
                rates[name].append(M * a.steps / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"preset={a.preset} device={dev} threads={torch.get_num_threads()} members={M} "
          f"(heads {p.heads} x {seeds} seeds) batch={cfg.batch_size} n={task.n_max}; "
          f"median of {a.blocks} alternating blocks of {a.steps} steps")
    for k in ("stacked", "separate"):
        print(f"  {k:9s} {med[k]:8.1f} model-steps/s  (blocks: {', '.join(f'{r:.1f}' for r in rates[k])})")
    print(f"ratio stacked / separate: {med['stacked'] / med['separate']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stacked", action="store_true", help="stacked sweep vs one model at a time (see above)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=0, help="--stacked: seeds per head count (0: 4 quick, 1 paper)")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=6, help="alternating timing blocks per model")
    ap.add_argument("--steps", type=int, default=20, help="steps per block")
    ap.add_argument("--gflops", action="store_true", help="our training step's GFLOP/s vs a same-shape matmul (see above)")
    ap.add_argument("--profile", action="store_true", help="--gflops: print the operator table of 10 steps")
    ap.add_argument("--set", action="append", default=[], help="--gflops: preset override KEY=VALUE (repeatable)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.gflops:
        return step_gflops(a)
    if a.stacked:
        return stacked_vs_separate(a)
    p = get_preset(a.preset)
    n_ex = p.task.n_max + 1
    torch.manual_seed(0)
    cfg = p.model_config_for(a.heads)
    models: dict[str, nn.Module] = {
        "ours (pair, MLP)": Transformer(cfg.model_copy(update={"mlp": True})),
        "GPT2Model (interleaved, MLP)": GPT2Reference(p.task.d, n_ex, p.model.d_model, p.model.n_layers, a.heads),
    }
    if not cfg.mlp:
        models[f"ours ({a.preset} preset: attention-only)"] = Transformer(cfg)
    steps = {k: step_fn(m, p.task, a.batch) for k, m in models.items()}
    for s in steps.values():  # warm-up
        for _ in range(3):
            s()
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(a.blocks):
        for k, s in steps.items():
            t = time.perf_counter()
            for _ in range(a.steps):
                s()
            rates[k].append(a.steps / (time.perf_counter() - t))
    print(f"preset={a.preset} d={p.task.d} n_max={p.task.n_max} D={p.model.d_model} L={p.model.n_layers} h={a.heads} "
          f"batch={a.batch} threads={a.threads}; median of {a.blocks} alternating blocks of {a.steps} steps")
    med = {k: statistics.median(v) for k, v in rates.items()}
    preds = {k: med[k] * a.batch * n_ex for k in med}  # every model predicts all n_max+1 prefixes per prompt
    for k in models:
        n_par = sum(q.numel() for q in models[k].parameters())
        print(f"  {k:40s} {med[k]:7.1f} steps/s  {preds[k]:9.0f} prefix-predictions/s  ({n_par} params)")
    ref = "GPT2Model (interleaved, MLP)"
    for k in models:
        if k != ref:
            print(f"ratio {k} / GPT2Model: steps/s {med[k] / med[ref]:.2f}x, "
                  f"prefix-predictions/s {preds[k] / preds[ref]:.2f}x")


if __name__ == "__main__":
    main()
