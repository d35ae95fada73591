"""benchmarks/eval_checkpoint.py: the two ways of acting of a DFP checkpoint, the run's time limit, and one clear
line for a mode a checkpoint does not have."""
import json
import os
import sys

import pytest
import torch

from conftest import ROOT

import common
import dfp_offline_to_online as dfp
from dbp_bc import DriftPolicy

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import eval_checkpoint  # noqa: E402

ENV_ID = "cube-double-play-singletask-task2-v0"  # Do = 37, Da = 5; builds in about a second


def save(path, module, kw, max_episode_steps, **state):
    common.save_checkpoint(path, dict(policy_module=module, policy_kwargs=kw, env_id=ENV_ID, run_name="test", step=0,
                                      args={"max_episode_steps": max_episode_steps, "success_timing": "pre"}, **state))
    return path


def dfp_checkpoint(tmp_path):
    """A DFP checkpoint with random weights: chunks of 5 actions, the best of N' = 4 under its critic."""
    torch.manual_seed(0)
    kw = dict(obs_dim=37, action_dim=5, horizon=5, hidden_dims=(16,), num_qs=2, n_best=4)
    policy = dfp.DFPPolicy(**kw)
    return save(str(tmp_path / "dfp.pt"), "dfp_offline_to_online", kw, 7, actor=policy.actor.state_dict(),
                critic=policy.critic.state_dict())


def test_dfp_best_of_n_and_actor_only_on_the_run_s_time_limit(tmp_path, capsys, monkeypatch):
    path = dfp_checkpoint(tmp_path)
    built = []
    load = common.load_policy
    monkeypatch.setattr(common, "load_policy", lambda *a, **k: built.append(load(*a, **k)) or built[-1])
    for flags in ([], ["--actor-only"]):
        result = eval_checkpoint.main([path, "--episodes", "3", "--num-envs", "1", *flags])
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["episodes"] == line["episodes"] == 3 and line["actor_only"] == bool(flags)
        assert result["length"] == 7  # the run's time limit (random weights never succeed)
    assert [p.n_best for p in built] == [4, 1]  # best of N' under the critic, then one actor sample


def test_actor_only_is_refused_for_a_checkpoint_without_that_mode(tmp_path):
    kw = dict(obs_dim=37, action_dim=5, n_obs_steps=1, horizon=4, n_action_steps=4, hidden_dims=(16,))
    policy = DriftPolicy(**kw)
    path = save(str(tmp_path / "dbp.pt"), "dbp_bc", kw, None, model=policy.state_dict(), ema_model=policy.state_dict())
    with pytest.raises(common.UserError, match="--actor-only: dbp_bc checkpoints have no such mode"):
        eval_checkpoint.main([path, "--actor-only"])
    with pytest.raises(common.UserError, match="does not exist"):
        eval_checkpoint.main([str(tmp_path / "missing.pt")])


def test_action_steps_replans_sooner_and_is_bounded_by_the_chunk(tmp_path, capsys, monkeypatch):
    path = dfp_checkpoint(tmp_path)
    calls = []
    load = common.load_policy

    def counted(*a, **k):
        p = load(*a, **k)
        act = p.act
        p.act = lambda obs: calls.append(len(obs)) or act(obs)
        return p

    monkeypatch.setattr(common, "load_policy", counted)
    for steps, expected in ((None, 2 * 3), (1, 7 * 3)):  # 3 episodes of 7 steps: chunks of 5 (2 calls) or 1 (7)
        calls.clear()
        eval_checkpoint.main([path, "--episodes", "3", "--num-envs", "1", *(["--action-steps", str(steps)] if steps else [])])
        assert sum(calls) == expected and json.loads(capsys.readouterr().out.splitlines()[-1])["action_steps"] == (steps or 5)
    with pytest.raises(common.UserError, match="--action-steps 6: this policy's chunks hold 5 executable actions"):
        eval_checkpoint.main([path, "--action-steps", "6"])
