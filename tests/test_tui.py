"""The chat UI driven by Textual's pilot with the real default model: type, send, stream, stop."""

import asyncio

from edge.sampling import SamplerConfig
from tui.app import ChatApp, Message


async def _wait(pilot, cond, timeout=120.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await pilot.pause(0.1)


def stats_text(app) -> str:
    return str(app.query_one("#stats").render())


def test_chat_exchange_and_stop():
    async def scenario():
        app = ChatApp(None, sampler=SamplerConfig(temperature=0), max_tokens=24, n_ctx=1024)
        async with app.run_test(size=(120, 36)) as pilot:
            await _wait(pilot, lambda: app.engine is not None)
            assert "ready" in stats_text(app)
            await pilot.click("#prompt")
            await pilot.press(*"What is the capital of France?")
            await pilot.press("enter")
            await _wait(pilot, lambda: not app.generating and len(app.messages) == 2)
            replies = app.query(Message).filter(".assistant")
            assert len(replies) == 1 and app.messages[1]["content"].strip()
            text = stats_text(app)
            assert "tok/s" in text and "RSS" in text and "context" in text
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
    asyncio.run(scenario())
