"""`python -m quantkit ...` is the `quantkit` command (for environments without its script on PATH)."""
from .cli import main

main(prog_name="quantkit")
