"""The chat's dialogs: help (the keys), budget (re-plan live), saved chats (reopen one)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

KEYS = [
    ("Enter", "send the message"),
    ("Esc / Ctrl+C", "stop the answer (the chat stays)"),
    ("Ctrl+B", "change the RAM budget now (the runtime re-plans, no restart)"),
    ("Ctrl+N", "new chat (the current one stays saved)"),
    ("Ctrl+O", "open a saved chat"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
]

DIALOG_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{ width: 72; height: auto; max-height: 80%; border: thick $primary; background: $surface;
                    padding: 1 2; }}
{name} .title {{ text-style: bold; margin-bottom: 1; }}
"""


class HelpScreen(ModalScreen):
    DEFAULT_CSS = DIALOG_CSS.format(name="HelpScreen")
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("Keys", classes="title")
            yield Static("\n".join(f"[b]{k:<14}[/b] {what}" for k, what in KEYS))
            yield Static("\nThe side panel: the RAM budget split by part (what stays resident, the neuron cache "
                         "that holds FFN clusters, what streams from flash), tokens/s now, flash MB/s and reads/s, "
                         "the cache's hit rate. Chats are saved as they happen; `edge chat --list` lists them.\n"
                         "Esc closes this help.")


class BudgetScreen(ModalScreen[str | None]):
    """Asks for a new budget (a size like 180MB); dismisses with the text, or None."""

    DEFAULT_CSS = DIALOG_CSS.format(name="BudgetScreen")
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, current: str, minimum: str | None):
        super().__init__()
        self.current, self.minimum = current, minimum

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("RAM budget", classes="title")
            hint = f" (the minimum for this model and context is {self.minimum})" if self.minimum else ""
            yield Static(f"Now {self.current}{hint}. A new size, like 200MB or 1.5GB; Enter applies it, Esc cancels.")
            yield Input(value=self.current, id="budget-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()  # the chat's own input handler must not see it
        self.dismiss(event.value.strip() or None)


class ChatsScreen(ModalScreen):
    """Saved chats, newest first; dismisses with the chosen SavedChat or None."""

    DEFAULT_CSS = DIALOG_CSS.format(name="ChatsScreen")
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, chats: list):
        super().__init__()
        self.chats = chats

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("Saved chats" if self.chats else "No saved chats yet", classes="title")
            yield OptionList(*[Option(f"{c.created}  {c.title}  ({len(c.messages)} messages)", id=str(i))
                               for i, c in enumerate(self.chats)], id="chats")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.chats[int(event.option.id)])
