"""DDP worker for test_train.py: run under ``torchrun --nproc_per_node 2`` on CPU (gloo).

Trains a tiny LoRA + recovery model and writes this rank's final trainable weights.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import tinypet as tiny  # noqa: E402


def main(out: str) -> None:
    from accelerate import Accelerator

    from cpet.distill import TaskLoss
    from cpet.lmcls import Verbalizer
    from cpet.pet import attach_lora, attach_recovery
    from cpet.train import Example, TokenizedExamples, train

    from libsettings import lora_settings, recovery_settings, train_config

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    tok = tiny.tokenizer()
    texts, labels = tiny.texts_and_labels(16)
    data = TokenizedExamples.build(tok, [Example(t, y, i) for i, (t, y) in enumerate(zip(texts, labels))],
                                   tiny.TEMPLATE, 32)
    torch.manual_seed(acc.process_index)  # different inits per rank: DDP must sync them from rank 0
    model = attach_lora(attach_recovery(tiny.model(), recovery_settings(rank=2)), lora_settings(rank=4))
    cfg = train_config(steps=4, batch_size=2, lr=1e-2, warmup_steps=1, eval_every=0, checkpoint_every=0)
    res = train(model, data, TaskLoss(Verbalizer.build(tok, tiny.LABEL_WORDS)), cfg, accelerator=acc,
                progress=False)
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, f"{out}/rank{acc.process_index}.safetensors",
              metadata={"world": str(acc.num_processes), "distributed_type": str(acc.distributed_type),
                        "steps": str(res.steps)})


if __name__ == "__main__":
    main(sys.argv[1])
