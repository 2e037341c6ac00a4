"""The protocols the GRPO step is typed with (train/protocols.py) match what is handed to it: every method a
protocol names exists on each implementation with the same parameters, and grpo_step is annotated with them."""

from __future__ import annotations

import inspect
import typing

import pytest

from questa_nemo.model.policy import MegatronPolicy
from questa_nemo.train import grpo
from questa_nemo.train.async_rollouts import AsyncRollouts
from questa_nemo.train.grpo import SyncRollouts
from questa_nemo.train.protocols import Policy, Rollouts


def _members(protocol: type) -> list[str]:
    return [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]


def _parameters(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(
    "protocol, implementation", [(Policy, MegatronPolicy), (Rollouts, SyncRollouts), (Rollouts, AsyncRollouts)]
)
def test_implementations_have_every_protocol_method(protocol, implementation):
    assert _members(protocol), "a protocol without methods checks nothing"
    for name in _members(protocol):
        assert hasattr(implementation, name), f"{implementation.__name__} has no {name}"
        ours, theirs = getattr(protocol, name), getattr(implementation, name)
        assert _parameters(theirs) == _parameters(ours), f"{implementation.__name__}.{name}"


def test_grpo_step_is_typed_with_the_protocols():
    hints = typing.get_type_hints(grpo.grpo_step)
    assert hints["policy"] is Policy and hints["rollouts"] is Rollouts
