"""`slimtune serve` as a user runs it: bad options are one-line errors (exit 2), and a real process
serves, answers with its key, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from slimtune.cli import main


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["slimtune", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["--adapter", "docs"], "--adapter 'docs' must be NAME=RUN_DIR"),
    (["--adapter", "a=alpha", "--adapter", "a=beta"], "names 'a' twice"),
    (["--adapter", "a=../elsewhere"], "contains '..'"),
    (["--adapter", "a=/etc"], "outside the adapter root"),
    (["--adapter", "a=missing"], "no directory"),
    ([], "no base model: pass --model"),
    (["--model", "m", "--adapter-root", "/no/such/dir"], "adapter root '/no/such/dir' is not a directory"),
    (["--model", "m", "--dtype", "float16"], "--dtype 'float16': use auto, float32 or bfloat16"),
    (["--model", "m", "--quantize", "nf4", "--dtype", "bfloat16"], "--dtype bfloat16 with an NF4 base"),
])
def test_bad_options_are_one_line_errors(monkeypatch, capsys, adapter_root, args, fragment):
    monkeypatch.chdir(adapter_root)
    code, err = run_cli(monkeypatch, capsys, "serve", "--port", "0", *args)
    assert code == 2 and "Traceback" not in err, err
    assert fragment in err, f"{fragment!r} must be in: {err}"


def test_taken_port_is_a_clear_error(monkeypatch, capsys, adapter_root, tiny_model_dir):
    from slimtune.serve.server import bind

    taken = bind("127.0.0.1", 0)
    try:
        code, err = run_cli(monkeypatch, capsys, "serve", "--model", tiny_model_dir, "--port",
                            taken.getsockname()[1])
    finally:
        taken.close()
    assert code == 2 and "cannot listen on 127.0.0.1" in err and "choose another --port" in err, err


def test_serve_process_end_to_end(adapter_root, tiny_model_dir):
    env = {**os.environ, "SLIMTUNE_API_KEY": "k-123", "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    process = subprocess.Popen(
        [sys.executable, "-m", "slimtune.cli", "serve", "--model", str(tiny_model_dir), "--adapter", "alpha=alpha",
         "--port", "0", "--allow-host", "myhost.test"], cwd=adapter_root, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline, url, lines = time.monotonic() + 120, None, []
        while url is None:
            assert time.monotonic() < deadline and process.poll() is None, "the server must start:\n" + "".join(lines)
            lines.append(process.stderr.readline())
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", lines[-1])
            url = found.group(1) if found else None
        while "Uvicorn running" not in lines[-1] and "startup complete" not in lines[-1]:
            lines.append(process.stderr.readline())
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k-123"}, timeout=30).json()
        assert [m["id"] for m in models["data"]] == [str(tiny_model_dir), "alpha"]
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401, "the key comes from SLIMTUNE_API_KEY"
        port = url.rsplit(":", 1)[1]
        for host, status in ((f"evil.example:{port}", 403), ("attacker.test", 403), (f"localhost:{port}", 200),
                             (f"[::1]:{port}", 200), (f"myhost.test:{port}", 200)):
            # A page on a rebound domain sends its own name as Host: refused on a loopback server.
            response = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k-123", "Host": host}, timeout=30)
            assert response.status_code == status, f"Host {host}: {response.status_code} {response.text}"
        reply = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k-123"}, timeout=60,
                           json={"model": "alpha", "prompt": "hi", "max_tokens": 3}).json()
        assert reply["usage"]["completion_tokens"] <= 3
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, f"Ctrl-C stops the server cleanly:\n{err}"
    assert "Traceback" not in err, err
