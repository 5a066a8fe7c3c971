"""``python -m ablate``: the ``ablate`` command (``ablate.cli``) where the console script is not installed."""
from ablate.cli import main

main()
