"""python -m common.prepare NAME --src RAW [--out DIR] [--force] [--copy] [--max-side N] [--seed S]"""
import sys

from common.prepare import main

sys.exit(main())
