"""Several models trained together (PPO's policy and value model), saved and resumed as one checkpoint.

    python ppo.py --out=runs/x ...    # latest/ holds the policy (model.safetensors) and value/ beside it

What it guards (tests/test_ppo.py: a PPO run interrupted and resumed ends with the weights of one never stopped):
machinery/checkpoints.py saves and resumes ONE module with one optimizer, through the module's own `save` and
`load`. A Bundle is that one module: its first model is written into the directory itself, so the directory still
loads as that model (model.load_model reads latest/ as a policy), and every other into a subdirectory of its name.
Each model brings its own `save(directory, meta, state_dict)` and `load(directory) -> state_dict`, so nothing here
imports the lesson files that define them.
"""

from pathlib import Path

import torch.nn as nn

from machinery import common


class Bundle(nn.Module):
    """Bundle(policy=..., value=...): the models as submodules, state_dict keys prefixed by their names."""

    def __init__(self, **models: nn.Module):
        super().__init__()
        for name, m in models.items():
            self.add_module(name, m)

    def save(self, directory: Path, meta: dict | None = None, state_dict: dict | None = None) -> None:
        """Every model through its own save, written aside and swapped in whole: never a policy without its value."""
        sd = self.state_dict() if state_dict is None else state_dict
        with common.new_dir(Path(directory), ".bundle") as tmp:
            for i, (name, m) in enumerate(self.named_children()):
                part = {k.removeprefix(name + "."): v for k, v in sd.items() if k.startswith(name + ".")}
                m.save(tmp if i == 0 else tmp / name, meta=meta, state_dict=part)

    def load(self, directory: Path) -> dict:
        """The whole weights `save` wrote, keyed as this module's state_dict()."""
        sd = {}
        for i, (name, m) in enumerate(self.named_children()):
            sd |= {f"{name}.{k}": v for k, v in m.load(Path(directory) if i == 0 else Path(directory) / name).items()}
        return sd
