from unionfs.cli.main import main

raise SystemExit(main())
