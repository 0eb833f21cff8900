import sys

from mbert_train.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
