"""The app: what the command line and the web page share (requests.py: a sample or edit request resolved once, run once,
and printed as the command that reproduces it) and the command implementations (commands.py)."""
