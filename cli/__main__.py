"""`python -m headmaster.cli`: the `headmaster` command."""

from headmaster.cli import main

main()
