from unionfs.cli.fast import main

raise SystemExit(main())
