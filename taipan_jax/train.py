r"""`python -m taipan_jax.train [flags]` is `taipan train [flags]` (see taipan_jax/cli.py).

    python -m taipan_jax.train --config=configs/tiny.py --workdir=/tmp/tiny
"""
import sys

from taipan_jax import cli

if __name__ == "__main__":
  cli.main([sys.argv[0], "train", *sys.argv[1:]])
