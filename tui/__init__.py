"""minillama-tui: a terminal debugger that watches the engine think, live or from a recorded trace."""
