"""btckpt with the Hugging Face Trainer: a tiny GPT-2 built from a config, CPU, a few seconds.

    python examples/hf_trainer.py

The first Trainer stops halfway (as if the job were preempted); the second one, built from scratch,
resumes from the newest complete checkpoint and finishes. Checkpoints go to $BT_CHECKPOINT_DIR
(a temporary folder when unset), the Trainer's output_dir to a temporary folder (nothing is left in the
working directory); each checkpoint-<step>/ loads with from_pretrained.
"""

from __future__ import annotations

import os
import tempfile

import torch
from btckpt.hf import CheckpointCallback, resume_checkpoint
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

VOCAB, SEQ, STEPS = 64, 16, 12


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (48, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAt(TrainerCallback):
    """Stand-in for a preemption: stop the first run after `step` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def make_trainer(extra: list[TrainerCallback], output_dir: str) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_layer=2, n_embd=32, n_head=2))
    args = TrainingArguments(output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
                             save_steps=3, save_total_limit=2, logging_steps=3, report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[CheckpointCallback(), *extra])


def main() -> None:
    work = tempfile.mkdtemp(prefix="btckpt-example-")
    os.environ.setdefault("BT_CHECKPOINT_DIR", os.path.join(work, "checkpoints"))
    out = os.path.join(work, "hf_out")  # the Trainer's output_dir (logs); not in the working directory
    print("checkpoints go to", os.environ["BT_CHECKPOINT_DIR"])

    first = make_trainer([StopAt(STEPS // 2)], out)
    first.train(resume_from_checkpoint=resume_checkpoint())  # None on the first run: starts fresh
    print("first run stopped at step", first.state.global_step)

    second = make_trainer([], out)
    start = resume_checkpoint()
    print("resuming from", start)
    second.train(resume_from_checkpoint=start)
    print("finished at step", second.state.global_step)

    final = resume_checkpoint()
    assert final is not None
    served = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = Tokens().ids[:2]
    with torch.no_grad():
        same = torch.equal(served(ids).logits, second.model.eval()(ids).logits)
    print(f"{final} loads with from_pretrained; logits match the trained model: {same}")
    print("kept:", sorted(os.listdir(os.environ["BT_CHECKPOINT_DIR"])))


if __name__ == "__main__":
    main()
