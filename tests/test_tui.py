"""The chat UI driven by Textual's pilot with the real default model (type, send, stream, stop, save, reopen,
change the budget live), a layout snapshot, and a real terminal (tmux) running `edge chat`."""

import asyncio
import os
import shutil
import subprocess
import sys
import time

import pytest

from edge.sampling import SamplerConfig
from edge.sizes import format_size
from tui import history
from tui.app import ChatApp, Message


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


async def _wait(pilot, cond, timeout=120.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await pilot.pause(0.1)


def panel(app) -> str:
    return str(app.query_one("#stats").render()) + "\n" + str(app.query_one("#live").render())


def test_chat_exchange_stop_save_and_reopen():
    async def scenario():
        app = ChatApp(None, sampler=SamplerConfig(temperature=0), max_tokens=24, n_ctx=1024)
        async with app.run_test(size=(130, 40)) as pilot:
            await _wait(pilot, lambda: app.engine is not None)
            assert "ready" in panel(app) and "no budget" in panel(app)
            await pilot.click("#prompt")
            await pilot.press(*"What is the capital of France?")
            await pilot.press("enter")
            await _wait(pilot, lambda: not app.generating and len(app.messages) == 2)
            replies = app.query(Message).filter(".assistant")
            assert len(replies) == 1 and app.messages[1]["content"].strip()
            text = panel(app)
            assert "tok/s" in text and "RSS" in text and "context" in text and "weights" in text
            assert app.engine.last.tok_s > 0

            # a second turn reuses the cached chat, and Esc stops a long answer without leaving the app
            app.max_tokens = 400
            await pilot.press(*"Tell me a long story about a dragon.")
            await pilot.press("enter")
            await _wait(pilot, lambda: len(app.engine.last.tokens) >= 3)
            await pilot.press("escape")
            await _wait(pilot, lambda: not app.generating)
            assert app.engine.last.stopped == "cancelled"
            assert app.engine.last.reused_tokens > 0
            assert len(app.messages) == 4 and app.is_running
            said = [dict(m) for m in app.messages]

            await pilot.press("f1")  # the help screen lists the keys, Esc closes it
            await pilot.pause(0.2)
            assert type(app.screen).__name__ == "HelpScreen"
            await pilot.press("escape")
            await pilot.pause(0.2)
            assert type(app.screen).__name__ == "Screen"

        # saved as it happened: the same four messages, the stopped answer as far as it went
        chats = history.saved_chats()
        assert len(chats) == 1 and [m["content"] for m in chats[0].messages] == [m["content"] for m in said]

        again = ChatApp(None, sampler=SamplerConfig(temperature=0), max_tokens=8, n_ctx=1024, resume=chats[0])
        async with again.run_test(size=(130, 40)) as pilot:
            await _wait(pilot, lambda: again.engine is not None)
            assert len(again.query(Message)) == 4 and again.messages == said
            await pilot.click("#prompt")
            await pilot.press(*"Thanks!")
            await pilot.press("enter")
            await _wait(pilot, lambda: not again.generating and len(again.messages) == 6)
        assert len(history.saved_chats()) == 1 and len(history.saved_chats()[0].messages) == 6
    asyncio.run(scenario())


async def _set_budget(pilot, size) -> None:
    """Ctrl+B, the new budget, Enter."""
    await pilot.press("ctrl+b")
    await pilot.pause(0.2)
    await pilot.press("ctrl+u", *str(size), "enter")


def test_budget_changes_live_from_the_keyboard(smol_calibrated):
    async def scenario():
        app = ChatApp(str(smol_calibrated), sampler=SamplerConfig(temperature=0), max_tokens=16, n_ctx=256,
                      threads=2, engine_options={"ram": 4 << 30}, save=False)
        async with app.run_test(size=(130, 40)) as pilot:
            await _wait(pilot, lambda: app.engine is not None)
            plan = app.engine.plan
            assert f"budget {format_size(plan.budget)}" in panel(app) and "neuron cache" in panel(app)
            await _set_budget(pilot, plan.minimum + 4 * plan.detail.slot_bytes)
            await _wait(pilot, lambda: app.engine.plan.budget != plan.budget)
            await pilot.pause(0.2)
            assert app.engine.plan.detail.slots == 4 and f"4/{plan.detail.n_clusters} FFN clusters" in panel(app)
            assert app.messages == []  # the dialog's Enter is not a chat message

            await pilot.click("#prompt")
            await pilot.press(*"Hello")
            await pilot.press("enter")
            await _wait(pilot, lambda: not app.generating and len(app.messages) == 2)
            text = panel(app)
            assert "MB/s" in text and "reads/s" in text and "clusters hit" in text and "read per token" in text

            before = app.engine.plan
            await _set_budget(pilot, "1MB")  # below the minimum: refused, nothing changes
            await pilot.pause(1.0)
            assert app.engine.plan is before and app.is_running
    asyncio.run(scenario())


def test_the_panel_shows_the_gpus_part(smol_store):
    from edge.strategies import Options

    async def scenario():
        app = ChatApp(str(smol_store), sampler=SamplerConfig(temperature=0), max_tokens=4, n_ctx=256, threads=2,
                      engine_options={"ram": 4 << 30, "options": Options(gpu="CPU", gpu_mem=30 << 20)}, save=False)
        async with app.run_test(size=(130, 40)) as pilot:
            await _wait(pilot, lambda: app.engine is not None)
            await pilot.pause(0.2)
            g = app.engine.gpu
            assert f"gpu     CPU {format_size(g.used)} of {format_size(g.budget)} (in RAM): attention, " \
                   f"{g.per_layer} clusters/layer" in panel(app)
    asyncio.run(scenario())


def test_bitstack_depth_changes_live(tiny_stacked):
    """On a stacked store the bar shows the loaded stack; Ctrl+B pops blocks off it and the chat goes on."""
    async def scenario():
        app = ChatApp(str(tiny_stacked), sampler=SamplerConfig(temperature=0), max_tokens=4, n_ctx=64,
                      threads=2, engine_options={"ram": 1 << 30}, save=False)
        async with app.run_test(size=(130, 40)) as pilot:
            await _wait(pilot, lambda: app.engine is not None)
            stack = app.engine.model.parts.linears
            full = len(stack.info.order)
            assert stack.prefix == full and f"{full}/{full} blocks past the base" in panel(app)
            await _set_budget(
                pilot, app.engine.plan.minimum + int(stack.info.prefix_bytes()[2]) - stack.info.base_bytes
            )
            await _wait(pilot, lambda: stack.prefix != full)
            await pilot.pause(0.2)
            assert stack.prefix == 2 and f"2/{full} blocks past the base" in panel(app) and "BitStack" in panel(app)
            await pilot.click("#prompt")
            await pilot.press(*"Hello", "enter")
            await _wait(pilot, lambda: not app.generating and len(app.messages) == 2)
    asyncio.run(scenario())


def test_layout_snapshot(snap_compare):
    """The layout with a fixed panel (no model: the figures are set by hand, so the picture is stable)."""
    parts = {"baseline": 66_000_000, "KV cache": 5_900_000, "weights": 27_400_000, "buffers": 18_000_000,
             "neuron cache": 21_800_000}

    async def setup(pilot):
        app = pilot.app
        app.speeds.extend([0, 12, 18, 21, 22, 20, 23, 22, 21, 24])
        app.stats.update(status="ready", model="SmolLM2 135M Instruct", arch="llama", quant="Q4_1", backend="ggml",
                         device="rpi5-nvme (flash emulated)", ctx=256, budget=140_000_000, minimum=118_000_000,
                         parts=parts, free=8_000_000_000, cache="21/48 FFN clusters per layer cached,\n56% stream",
                         tok_s=21.3, prefill_tok_s=80.2, tokens=45, flash_mb_s=402.0, reads_s=1310,
                         read_per_token=23_700_000, hit_rate=0.437, rss=139_000_000, position=81)
        app._refresh_stats()
        chat = app.query_one("#chat")
        await chat.mount(Message("What is the capital of France?", classes="user"))
        await chat.mount(Message("The capital of France is **Paris**.", classes="assistant"))
        await pilot.pause()

    assert snap_compare(ChatApp(autoload=False, save=False), terminal_size=(120, 40), run_before=setup)


def test_saved_chat_survives_a_torn_last_line(tmp_path):
    log = history.ChatLog.new("m", "be brief")
    log.user("hi")
    log.delta("Hel")
    log.delta("lo")
    log.close()
    with open(log.path, "a") as f:
        f.write('{"role": "assistant", "del')  # killed mid-write
    chat = history.load(log.path)
    assert chat.system == "be brief" and [m["content"] for m in chat.messages] == ["hi", "Hello"]
    assert history.find("last").path == log.path and history.find(log.path.stem[:8]).path == log.path
    with pytest.raises(Exception, match="--resume nope"):
        history.find("nope")


def test_chat_list_and_resume_flags(capsys):
    from edge.cli import main

    assert main(["chat", "--list"]) == 0
    assert "no saved chats" in capsys.readouterr().out
    log = history.ChatLog.new("SmolLM2", None)
    log.user("What is flash?")
    log.close()
    assert main(["chat", "--list"]) == 0
    assert "What is flash?" in capsys.readouterr().out
    assert main(["chat", "--resume", "zzz"]) == 2
    assert "--resume zzz" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_fresh_chat_in_a_real_terminal(tmp_path):
    """A fresh `edge chat --ram` in tmux, as a new user runs it: the default model is prepared with progress in
    the panel, then an answer appears and the panel shows the budget and the speed."""
    session = f"edge-test-{os.getpid()}"
    # (pytest's plugins export COLUMNS/LINES of 80x24; a real terminal has none)
    env = f"env -u COLUMNS -u LINES XDG_DATA_HOME={tmp_path} XDG_CONFIG_HOME={tmp_path} XDG_CACHE_HOME={tmp_path}"
    cmd = f"{env} {sys.executable} -m edge chat --ram 4GB --ctx 256 --threads 2 --temp 0 -n 24"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "130", "-y", "42", cmd], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-t", session, "-p"], capture_output=True, text=True).stdout

    def wait_for(text: str, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = screen()
            if text in s:
                return s
            time.sleep(0.3)
        raise AssertionError(f"{text!r} never appeared:\n{screen()}")

    try:
        wait_for("the default model")  # first run: converting, then calibrating, with a percentage
        wait_for("ready", timeout=240)
        subprocess.run(["tmux", "send-keys", "-t", session, "What is the capital of France?", "Enter"], check=True)
        shown = wait_for("decode")
        assert "budget 4.0GB" in shown and "neuron cache" in shown and "tok/s" in shown
        chat_side = "\n".join(line[:80] for line in shown.splitlines())
        assert "What is the capital of France?" in chat_side
        answer = chat_side.split("What is the capital of France?", 1)[1]
        assert sum(c.isalpha() for c in answer) > 10  # an answer, in the chat pane
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
