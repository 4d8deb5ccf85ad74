"""The `edge chat` subcommand, registered through the `edge.commands` entry point; Textual loads on run."""

EXAMPLES = """examples:
  edge chat                                   # the default model (SmolLM2-135M-Instruct)
  edge chat model.gguf --system "You are terse."
keys: Enter sends, Esc or Ctrl+C stops the answer (the chat stays), Ctrl+N new chat, Ctrl+Q quits
"""


def register(sub) -> None:
    from edge.cli import add_command

    p = add_command(sub, "chat", "chat in the terminal UI", EXAMPLES, _run, ctx_default=4096, temp_default=0.7)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(max_tokens=512)


def _run(args) -> int:
    from tui.app import run_chat

    return run_chat(args)
