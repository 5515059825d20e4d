"""Sandbox pilot, design (b) (docs/results.md): the real SmolLM2-135M teacher with a small student of its
49,152-token vocabulary, CE-pretrained from scratch for a fixed wall budget. Measures what decides the
design: the held-out CE gap to the teacher, the starting KL, and tokens/s (student CE step, teacher
forward). Reads the stdlib corpus (data.py), nothing else.

    python bench/sandbox_pilot_b.py --minutes 8
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import heldout  # noqa: E402
import models  # noqa: E402
import sandbox  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--minutes", type=float, default=8.0)
p.add_argument("--seq-len", type=int, default=128)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--lr", type=float, default=3e-3)
args = p.parse_args()
torch.manual_seed(0)
teacher, tok = models.load_model("smollm2")
teacher.requires_grad_(False)
V = len(tok)
splits = data.load_splits(tok, None, args.seq_len, tokens=6_000_000, eval_tokens=16_384)
student = sandbox.init_model(tok, **sandbox.SCALES["full"]["student"])
n_params = sum(p.numel() for p in student.parameters())
opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
train, budget, t0, seen, step = splits["train"], args.minutes * 60, time.time(), 0, 0
order = torch.randperm(len(train))
while time.time() - t0 < budget and (step + 1) * args.batch_size <= len(train):
    frac = (time.time() - t0) / budget
    for g in opt.param_groups:
        g["lr"] = args.lr * min(1.0, 20 * frac) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # warmup, cosine
    idx = order[step * args.batch_size:(step + 1) * args.batch_size]
    x, y = train.input_ids[idx], train.targets[idx]
    loss = torch.nn.functional.cross_entropy(student(x).logits[..., :V].flatten(0, 1), y.flatten(), ignore_index=-100)
    loss.backward(); opt.step(); opt.zero_grad(); step += 1; seen += x.numel()
train_s = time.time() - t0
student.eval()
held = splits["val"]
t1 = time.time()
m = heldout.heldout_metrics(student, held.batches(8), teacher=teacher, vocab_size=V, chunk_size=256)
eval_s = time.time() - t1
out = dict(design="b", student_params=n_params, steps=step, train_tokens=seen, train_s=round(train_s, 1),
           student_tok_s=round(seen / train_s), heldout_tokens=int(held.valid.sum()),
           teacher_fwd_tok_s=round(int(held.valid.sum()) / max(eval_s, 1e-9)),
           student_ce=m["loss"], teacher_ce=m["teacher_loss"], ce_gap=m["loss"] - m["teacher_loss"],
           start_kl=m["kl_to_teacher"], top1_agree=m["top1_agree"])
print(json.dumps(out))
