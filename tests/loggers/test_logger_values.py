import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from tttexp.loggers.values import plain_dict, to_plain


def test_trainer_values_become_plain_json() -> None:
    config = OmegaConf.create(
        {"model": {"hidden_size": 64, "layers": [1, 2]}, "lr": "${optim.lr}", "optim": {"lr": 0.1}}
    )
    values = {
        "config": config,
        "loss": torch.tensor(2.5),
        "tokens": np.int64(4096),
        "ratio": np.float32(0.5),
        "flag": np.bool_(True),
        "vector": torch.tensor([1.0, 2.0]),
        "path": Path("/tmp/run"),
        "device": torch.device("cpu"),
        "pair": (1, "a"),
    }
    plain = plain_dict(values)
    assert plain == {
        "config": {"model": {"hidden_size": 64, "layers": [1, 2]}, "lr": 0.1, "optim": {"lr": 0.1}},
        "loss": 2.5,
        "tokens": 4096,
        "ratio": 0.5,
        "flag": True,
        "vector": [1.0, 2.0],
        "path": "/tmp/run",
        "device": "cpu",
        "pair": [1, "a"],
    }
    assert type(plain["tokens"]) is int and type(plain["flag"]) is bool
    json.dumps(plain)


def test_plain_values_pass_through() -> None:
    for value in (None, True, 3, 2.5, "text", float("nan")):
        assert to_plain(value) is value
