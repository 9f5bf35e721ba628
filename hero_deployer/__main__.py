import sys

from hero_deployer.cli import main

sys.exit(main())
