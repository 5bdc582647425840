"""``python -m producer`` is ``ragq``."""

from producer.cli import main

main()
