"""``python -m emulators.azure_keyvault``: see :mod:`emulators.azure_keyvault.cli`."""

import sys

from emulators.azure_keyvault.cli import main

if __name__ == "__main__":
    sys.exit(main())
