from msconv.cli import main

raise SystemExit(main())
