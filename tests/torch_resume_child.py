"""A real PyTorch training run under a CheckpointManager (run by test_torch_resume.py).

``python torch_resume_child.py STORE LOG.jsonl [DIE_IN_EPOCH]``: trains a small
MLP with dropout, AdamW and a StepLR schedule on generated data, with
deterministic algorithms, checkpointing every epoch through
``ckpt.torch.capture``. Each finished epoch appends its loss (as float.hex) to
LOG; with DIE_IN_EPOCH the process SIGKILLs itself halfway through that
epoch. Run again, it resumes from the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import torch

import ckpt
import ckpt.torch

EPOCHS = 8


def main() -> int:
    root, log = sys.argv[1], sys.argv[2]
    die_in = int(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    data_gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=data_gen)
    y = (x[:, :5].sum(1) > 0).long()

    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(64, 2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    with ckpt.CheckpointManager(root, monitor="loss", keep=ckpt.Keep(last=2)) as mgr:
        state = mgr.restore_latest(default=None)
        if state is not None:
            ckpt.torch.apply(state, model=model, optimizer=opt, scheduler=sched)
        for epoch in range(mgr.next_step, EPOCHS):
            model.train()
            perm = torch.randperm(512)
            total = 0.0
            for i in range(0, 512, 32):
                if epoch == die_in and i == 256:
                    os.kill(os.getpid(), signal.SIGKILL)
                idx = perm[i : i + 32]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                total += loss.item()
            sched.step()
            with open(log, "a") as f:
                f.write(json.dumps({"epoch": epoch, "loss": total.hex()}) + "\n")
            state = ckpt.torch.capture(model=model, optimizer=opt, scheduler=sched)
            mgr.save(epoch, state, metrics={"loss": total})
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    with open(log, "a") as f:
        f.write(json.dumps({"final": hashlib.sha256(weights).hexdigest()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
