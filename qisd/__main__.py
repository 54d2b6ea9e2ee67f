"""``python -m qisd``: the same command line as the ``qisd`` console script."""

from qisd.cli import main

if __name__ == "__main__":
    main()
