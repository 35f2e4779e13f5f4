"""``kvrelay bench run`` end to end against a tiny local OpenAI-style SSE server; its errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from kvrelay.loadtest import run


def _app() -> web.Application:
    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(body["max_tokens"]):
            await resp.write(b"data: " + json.dumps({"choices": [{"text": f"t{i}"}]}).encode() + b"\n\n")
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "fake"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/v1/models", models)
    return app


@pytest.fixture
async def url() -> AsyncIterator[str]:
    runner = web.AppRunner(_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_bench_run_writes_result_and_plots(url: str, tmp_path: Path) -> None:
    args = run._args(["--url", url, "--workload", "agentic", "--requests", "6", "--arrival", "concurrency:2",
                      "--pause-scale", "0", "--max-context", "2048", "--max-output", "20",
                      "--slo-ttft-ms", "60000", "--slo-itl-ms", "60000", "--out", str(tmp_path),
                      "--no-progress"])
    result = await run._main(args)
    s = result["summary"]
    assert s["requests"] == 6 and s["completed"] == 6 and s["errors"] == {}
    assert s["goodput"] == 1.0 and 6 <= s["output_tokens"] <= 6 * 20
    assert s["itl_ms_count"] == s["output_tokens"] - 6  # one gap per token after each first
    assert result["conditions"]["target"]["model"] == "fake"
    assert result["conditions"]["source"]["requests_planned"] >= 6
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["summary"]["completed"] == 6
    for name in ("latency_cdf.png", "throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_bench_run_replays_a_trace(url: str, tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": i * 10, "input_length": 40, "output_length": 3,
                                         "hash_ids": [i % 2]}) + "\n" for i in range(4)))
    args = run._args(["--url", url, "--trace", str(trace), "--trace-block-size", "32", "--no-progress"])
    result = await run._main(args)
    assert result["summary"]["completed"] == 4 and result["summary"]["output_tokens"] == 12
    assert result["conditions"]["arrival"].startswith("trace replay")


def test_bench_run_bad_trace_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 5, "input_length": 10, "output_length": 2, "hash_ids": []}\n'
                   '{"timestamp": 1, "input_length": 10, "output_length": 2, "hash_ids": []}\n')
    rc = run.main(["--url", "http://127.0.0.1:9", "--trace", str(bad), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "before the previous line" in err


def test_bench_run_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    rc = run.main(["--url", "http://127.0.0.1:9", "--workload", "cot", "--requests", "1", "--no-progress"])
    assert rc == 1 and "cannot list models" in capsys.readouterr().err


def test_bench_run_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        run._args(["--url", "http://x", "--requests", "0"])
    with pytest.raises(SystemExit):
        run._args(["--workload", "mix"])  # no target
