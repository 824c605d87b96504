from forgetless.cli import main
import sys

sys.exit(main())
