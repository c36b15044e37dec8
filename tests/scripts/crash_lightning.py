"""The crash harness's Lightning save path: ``lightning_train.Tiny`` fitted with
``btckpt.lightning.SafetensorsCheckpointIO`` (async) and ``ModelCheckpoint`` (every ``--every`` steps, top-2 by
step, ``last.ckpt``), resumed from ``resume_path()``.

Follows the contract in ``crash_train.py``'s docstring: ``RESTORED <step|none>``, ``TRAINING``, and on a
normal finish ``{"step", "digest"}`` in ``--out`` (parameters, buffers, optimizer, step and the next draws
of every RNG).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

import numpy as np
import torch
from crash_train import _plain, _tensors, script_args
from rank_output import say


def main() -> int:
    a = script_args(sleep=0.0)

    import lightning as L
    from btckpt.lightning import ModelCheckpoint, SafetensorsCheckpointIO, resume_path
    from lightning_train import Batches, Tiny

    L.seed_everything(0, verbose=False)
    model = Tiny(sleep=a.sleep)
    top_k = -1 if os.environ.get("CRASH_KEEP_ALL") else 2
    cb = ModelCheckpoint(dirpath=a.dir, every_n_train_steps=a.every, save_top_k=top_k, monitor="step", mode="max",
                         save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=a.steps, plugins=[SafetensorsCheckpointIO()],
                        callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        deterministic=True, num_sanity_val_steps=0, use_distributed_sampler=False)
    start = resume_path(dir=a.dir)
    say(f"RESTORED {start.rsplit('-', 1)[1] if start else 'none'}")
    say("TRAINING")
    trainer.fit(model, train_dataloaders=Batches(), ckpt_path=start)

    h = hashlib.sha256()
    for sd in (model.state_dict(), trainer.optimizers[0].state_dict()):
        h.update(json.dumps(_plain(sd), sort_keys=True).encode())
        for t in _tensors(sd):
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(str(trainer.global_step).encode())
    h.update(torch.rand(4).numpy().tobytes() + repr(random.random()).encode() + np.random.rand(4).tobytes())
    with open(a.out, "w") as f:
        json.dump({"step": trainer.global_step, "digest": h.hexdigest()}, f)
    say("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
