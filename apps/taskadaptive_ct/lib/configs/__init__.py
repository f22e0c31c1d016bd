"""One config per model kind; each gives its infer tasks and its train task (``main.py`` wires them)."""
