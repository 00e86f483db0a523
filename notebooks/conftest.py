"""nbval runs these notebooks in real Jupyter kernels; give them a private KT_HOME."""

import os
import tempfile

os.environ["KT_HOME"] = tempfile.mkdtemp(prefix="kt_home_nbval_")
