"""`kvrelay up`'s pure parts: the banner's sample request names the model the router serves; core plan."""

from __future__ import annotations

import json
import re

from kvrelay.config import load
from kvrelay.models import resolve, served_name
from kvrelay.up import _banner, core_plan


def test_up_banner_sample_names_the_served_model(tmp_path) -> None:
    folder = str(resolve("tiny"))
    cfg = load(None, [], {"router": {"model": folder}, "engine": {"model": folder}})
    text = _banner(cfg, "nats://127.0.0.1:4222", tmp_path, started=0.0)
    body = json.loads(re.search(r"-d '(\{.*\})'", text).group(1))
    assert body["model"] == served_name(folder) == "kvrelay-tiny"


def test_up_core_plan_spreads_engines_over_cores() -> None:
    assert core_plan(1, 1, 2) == ["0", "1"]
    assert core_plan(2, 2, 2) == ["0", "1", "0", "1"]
    assert core_plan(1, 1, 1) == ["0", "0"]
