"""opd: on-policy distillation experiments on top of verl.

Login-side modules (``opd.launch``, ``opd.report``) import neither torch nor verl at import time.
"""

__version__ = "0.1.0"
