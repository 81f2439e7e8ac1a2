"""A pytest plugin (pyproject's addopts), loaded before Django's settings: the tests run Keyway in its
development mode, whose secrets are generated into var/, unless the environment says otherwise. Keyway's
own default is DEBUG off."""

import os

os.environ.setdefault("DEBUG", "1")
