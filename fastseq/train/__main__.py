"""`python -m fastseq.train ARGS` (and `deepspeed --module fastseq.train ARGS`): `fastseq train ARGS`."""

import sys

from fastseq.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
