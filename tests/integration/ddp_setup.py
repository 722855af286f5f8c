"""The tiny problem shared by the single-process and the two-process runs of the DDP test."""

import torch
from torch import nn

from distillery.data import ArrayDataset
from distillery.losses import CrossEntropyLoss, KDLoss, Objective
from distillery.teachers import FrozenTeacher
from distillery.train import TrainConfig


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    y[::3] = -100  # unlabelled rows, unevenly spread over the processes' shards
    return ArrayDataset(x, y, torch.arange(64))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def teacher():
    torch.manual_seed(1)
    return FrozenTeacher(nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)))


def objective():
    return Objective({"ce": CrossEntropyLoss(), "kd": KDLoss(2.0, 0.7)}, weights={"ce": 0.5, "kd": 1.0})


def config():
    return TrainConfig(steps=20, batch_size=16, grad_accum=2, optimizer={"name": "adamw", "lr": 0.01})
