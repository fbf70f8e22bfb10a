"""`python -m flows` is the same as the `s2v-batch` command."""

from flows.cli import main

main()
