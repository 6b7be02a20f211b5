"""A config module that ends the process that imports it (a stand-in for a module whose native import
crashes): a remote Launch of it must fail, and the launcher serving the call must live on."""

import os

os._exit(3)
