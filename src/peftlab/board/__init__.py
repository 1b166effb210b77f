"""peftlab board: the browser workbench (runs, new-run form, live curves, compare, chat)."""
