"""The terminal chat UI (Textual). Talks to the runtime only through edge.engine."""
