"""Three optimizer steps of the tiny twin on a fixed global batch, single- or multi-process.

Run as ``python parallel_steps.py MODEL DATA STRATEGY OUT`` (one process) or under torchrun.
Each rank takes its slice of the global batch and divides its summed loss by
``loss_divisor`` (global label tokens / ranks), so every strategy must print the same losses.
"""

import json
import sys

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from automodel.datasets.collate import default_collate_fn
from automodel.datasets.vlm import make_cord_v2_dataset
from automodel.distributed.env import all_reduce_sum, destroy, init_distributed, loss_divisor
from automodel.distributed.parallelize import build_mesh, parallelize
from automodel.loss import MaskedCrossEntropy
from automodel.models.forward import label_logits

model_dir, data_dir, strategy, out = sys.argv[1:5]
info = init_distributed()
torch.manual_seed(0)


class Step(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, labels):
        return label_logits(self.model, batch, labels)


model = AutoModelForImageTextToText.from_pretrained(model_dir)
model.model.vision_tower.requires_grad_(False)
processor = AutoProcessor.from_pretrained(model_dir)
dataset = make_cord_v2_dataset(data_dir, split="train")
module = Step(model).train()
mesh = build_mesh("cpu", info.world_size) if info.world_size > 1 else None
module = parallelize(module, mesh, strategy if info.world_size > 1 else "none")
# SGD, not Adam: Adam is blind to a constant gradient scale, which is what ranks can get wrong.
optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.2)
loss_fn = MaskedCrossEntropy()
global_batch = 4
losses = []
for step in range(3):
    indices = list(range(step * global_batch, (step + 1) * global_batch))
    mine = indices[info.rank :: info.world_size]
    batch = default_collate_fn([dataset[i] for i in mine], processor)
    batch.pop("dropped")
    labels = batch.pop("labels")
    divisor = loss_divisor((labels[:, 1:] != -100).sum(), info.world_size)
    logits, targets = module(batch, labels)
    loss = loss_fn(logits, targets, divisor)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(float(all_reduce_sum(loss.detach().clone())) / info.world_size)
if info.is_main:
    with open(out, "w") as f:
        json.dump(losses, f)
destroy()
