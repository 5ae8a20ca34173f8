import sys

from distprop.cli import main

sys.exit(main())
