"""The HTTP server of `cpmgen serve` (app.py) and its writing page (static/index.html)."""
