"""``python -m pgoutbox_proof PROOF.json --public-key KEY``: check a proof offline."""

import sys

from pgoutbox_proof import main

sys.exit(main())
