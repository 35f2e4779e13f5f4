"""`kvrelay up`'s restart policy: back-off that doubles, a bounded number of restarts per window."""

from __future__ import annotations

import pytest

from kvrelay.config import load
from kvrelay.schemas.errors import ValidationError
from kvrelay.supervisor import RestartPolicy, SuperviseConfig


def _policy(**kw) -> RestartPolicy:
    return RestartPolicy(SuperviseConfig(**{"max_restarts": 3, "window_s": 60.0, "backoff_initial_s": 0.5,
                                            "backoff_max_s": 1.5, **kw}))


def test_supervisor_backoff_doubles_up_to_its_cap() -> None:
    p = _policy()
    delays = [p.on_exit(t).delay_s for t in (0.0, 1.0, 2.0)]
    assert delays == [0.5, 1.0, 1.5]
    assert p.total == 3


def test_supervisor_one_exit_past_the_budget_inside_the_window_gives_up() -> None:
    p = _policy()
    for t in (0.0, 1.0, 2.0):
        assert p.on_exit(t).restart
    last = p.on_exit(3.0)
    assert not last.restart and last.restarts_in_window == 3


def test_supervisor_exits_older_than_the_window_are_forgotten() -> None:
    p = _policy()
    for t in (0.0, 1.0, 2.0):
        p.on_exit(t)
    later = p.on_exit(61.5)  # the exits at 0 and 1 s left the window
    assert later.restart and later.restarts_in_window == 2 and later.delay_s == 1.0
    assert p.total == 4


def test_supervisor_zero_restarts_never_restarts() -> None:
    assert not _policy(max_restarts=0).on_exit(0.0).restart


def test_supervisor_config_section_is_validated_with_the_key_named() -> None:
    assert load(None, ["supervise.max_restarts=2"]).supervise.max_restarts == 2
    with pytest.raises(Exception, match="supervise.max_restarts"):
        load(None, ["supervise.max_restarts=-1"])
    with pytest.raises(ValidationError):
        SuperviseConfig.from_mapping({"restarts": 1})
