"""machinery/model_bundle.py: several models saved and read back as one checkpoint. Each docstring names the bug its
test would catch."""

import torch

import model as gpt
import reward
from machinery import model_bundle

TINY = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)


def test_a_bundle_round_trips_every_model_and_its_first_still_loads_alone(tmp_path):
    """Catches a model's weights written under another model's name (keys not split by prefix), the value model
    saved over the policy (both into the same directory), and a first model moved into a subdirectory, after which
    model.load_model could no longer read latest/ or final/ as a policy. Oracle: the tensors before saving."""
    torch.manual_seed(0)
    policy, value = gpt.GPT(TINY), reward.RewardModel(gpt.GPT(TINY))
    with torch.no_grad():
        value.head.weight.normal_()
    bundle = model_bundle.Bundle(policy=policy, value=value)
    bundle.save(tmp_path / "ckpt", meta={"step": 3})
    loaded = model_bundle.Bundle(policy=gpt.GPT(TINY), value=reward.RewardModel(gpt.GPT(TINY))).load(tmp_path / "ckpt")
    want = bundle.state_dict()
    assert set(loaded) == set(want), sorted(set(loaded) ^ set(want))
    worst = max((loaded[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst == 0.0, f"max |diff| {worst} after a round trip"
    alone = gpt.load_model(str(tmp_path / "ckpt")).state_dict()
    assert all(torch.equal(alone[k], policy.state_dict()[k]) for k in alone), "the directory no longer loads as the policy"
    assert torch.equal(reward.load_reward_model(tmp_path / "ckpt" / "value").head.weight, value.head.weight)
