import sys

from torch_mosa.cli import main

sys.exit(main())
