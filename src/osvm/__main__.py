from osvm.cli.main import main

raise SystemExit(main())
