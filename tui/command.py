"""The `edge chat` subcommand, registered through the `edge.commands` entry point; Textual loads on run."""

EXAMPLES = """examples:
  edge chat                                   # the default model (SmolLM2-135M-Instruct)
  edge chat --ram 150MB                       # under a RAM budget (the default model is prepared on first use)
  edge chat model.edge --ram 2GB --device rpi5-nvme --emulate   # how it would feel on a Pi 5's flash
  edge chat model.gguf --system "You are terse."
  edge chat --list                            # saved chats
  edge chat --resume last                     # reopen the newest saved chat
keys: Enter sends, Esc or Ctrl+C stops the answer (the chat stays), Ctrl+B changes the budget live,
      Ctrl+N new chat, Ctrl+O open a saved chat, F1 help, Ctrl+Q quits
chats are saved as they happen under $XDG_DATA_HOME/edge/chats (default ~/.local/share/edge/chats)
"""


def register(sub) -> None:
    from edge.cli import add_command

    p = add_command(sub, "chat", "chat in the terminal UI", EXAMPLES, _run, temp_default=0.7)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--list", action="store_true", help="list the saved chats and exit")
    p.add_argument("--resume", default=None, metavar="ID", help="reopen a saved chat: its id (or a prefix), or 'last'")
    p.set_defaults(max_tokens=512)


def _run(args) -> int:
    from tui.app import run_chat

    return run_chat(args)
