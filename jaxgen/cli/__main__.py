import sys

from jaxgen.cli.app import main

sys.exit(main())
