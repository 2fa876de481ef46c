"""``python -m d2mc``: the command line (also what ``torchrun ... -m d2mc recover`` runs in each process)."""

from d2mc.cli import main

main()
