"""nbval runs these notebooks in real Jupyter kernels; give them a private KT_HOME."""

import os
import tempfile

os.environ["KT_HOME"] = tempfile.mkdtemp(prefix="kt_home_nbval_")
# each notebook's pod kernels stop when its kernel exits, not after the restart grace period
os.environ.setdefault("KT_OWNER_GRACE_S", "0")
