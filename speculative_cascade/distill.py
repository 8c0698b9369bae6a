"""Knowledge distillation of the tiny projection model (``cascade distill``).

Data: the teacher's own greedy generations on instruction prompts (on-policy; the
default prompts ship in ``data/distill_prompts.txt``), or the text of a file. The
teacher (the target, or its INT8 draft) scores every sequence in one forward; its
top-``TOPK`` next-token probabilities at every position are the soft labels. The tiny
model is trained with cross-entropy against them (Hinton et al., 2015), checkpointed
every epoch (``--resume`` continues), and judged on held-out sequences by greedy
agreement with the teacher. The same sequences also give MaG's bigram table.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CascadeError
from .stages.mag import BigramTable
from .stages.tiny import TinyProjection

TOPK = 16


@dataclass(frozen=True)
class DistillConfig:
    max_new_tokens: int = 192  # per prompt, on-policy generation
    epochs: int = 12
    batch_size: int = 1024
    lr: float = 3e-3
    holdout: float = 0.1  # fraction of sequences held out for the agreement figure
    seed: int = 0


def generate_sequences(generator, prompts: list[str], max_new_tokens: int, progress=None) -> list[list[int]]:
    """Prompt + the target's greedy continuation, token ids, one list per prompt."""
    seqs = []
    for p in prompts:
        ids = generator.encode(p, chat=bool(getattr(generator.tokenizer, "chat_template", None)))
        out = generator.generate_ids(ids, max_new_tokens=max_new_tokens)
        seqs.append(ids + out)
        if progress:
            progress()
    return seqs


def text_sequences(tokenizer, path: Path, length: int = 256) -> list[list[int]]:
    if not Path(path).is_file():
        raise CascadeError(f"text file not found: {path}")
    ids = tokenizer.encode(Path(path).read_text(encoding="utf-8", errors="replace"))
    if len(ids) < 2:
        raise CascadeError(f"{path}: not enough text")
    return [ids[i : i + length] for i in range(0, len(ids) - 1, length) if len(ids[i : i + length]) > 1]


@torch.inference_mode()
def soft_labels(teacher, seqs: list[list[int]], progress=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs (N,), top-k ids (N, TOPK), top-k probs (N, TOPK)) over every next-token position."""
    xs, ids, ps = [], [], []
    for s in seqs:
        cache = teacher.new_cache(len(s) + 1)
        logits = teacher(torch.tensor([s[:-1]]), cache)[0]  # (T - 1, V)
        top = torch.topk(torch.softmax(logits.float(), -1), TOPK, dim=-1)
        xs.append(torch.tensor(s[:-1]))
        ids.append(top.indices)
        ps.append(top.values)
        if progress:
            progress()
    return torch.cat(xs), torch.cat(ids), torch.cat(ps)


def distill_loss(model: TinyProjection, x, top_ids, top_p) -> torch.Tensor:
    logq = F.log_softmax(model(x), dim=-1)  # (B, V)
    return -(top_p * logq.gather(1, top_ids)).sum(-1).mean()


@torch.no_grad()
def agreement(model: TinyProjection, x, top_ids) -> float:
    """Fraction of positions where the tiny model's argmax is the teacher's."""
    if len(x) == 0:
        return float("nan")
    hits = 0
    for i in range(0, len(x), 4096):
        hits += int((model(x[i : i + 4096]).argmax(-1) == top_ids[i : i + 4096, 0]).sum())
    return hits / len(x)


def bigram_agreement(table: BigramTable, x, top_ids) -> float:
    pred = torch.as_tensor(table.next)[x]
    return float((pred == top_ids[:, 0]).float().mean()) if len(x) else float("nan")


def train(
    model: TinyProjection,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: DistillConfig,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    on_step=None,
) -> dict:
    """Train in place; return {'epochs', 'loss', 'seconds'}. Checkpoints (model + optimizer) every epoch."""
    x, top_ids, top_p = data
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    start = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        try:
            state = torch.load(checkpoint, weights_only=True)
            model.load_state_dict(state["model"], strict=False)
            opt.load_state_dict(state["optimizer"])
            start = int(state["epoch"])
        except Exception as e:  # a corrupt or foreign checkpoint
            raise CascadeError(f"{checkpoint}: cannot resume from it ({e})") from e
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = max(1, math.ceil(len(x) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    done = start * steps_per_epoch  # steps taken before a resume

    def cosine(s: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(s + done, total) / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    t0 = time.perf_counter()
    loss = float("nan")
    model.train()
    for epoch in range(start, cfg.epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch_size):
            b = perm[i : i + cfg.batch_size]
            loss_t = distill_loss(model, x[b], top_ids[b], top_p[b])
            opt.zero_grad(set_to_none=True)
            loss_t.backward()
            opt.step()
            sched.step()
            loss = float(loss_t.detach())
            if on_step:
                on_step(epoch, loss)
        if checkpoint is not None:
            state = {"model": {k: v for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}
            torch.save({**state, "epoch": epoch + 1}, checkpoint)
    model.eval()
    return {"epochs": cfg.epochs, "loss": loss, "seconds": time.perf_counter() - t0}


def split(seqs: list[list[int]], holdout: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(seqs), generator=g).tolist()
    n_hold = max(1, int(round(len(seqs) * holdout))) if len(seqs) > 1 and holdout > 0 else 0
    hold = [seqs[i] for i in order[:n_hold]]
    return [seqs[i] for i in order[n_hold:]], hold
