from std_web.cli import main

raise SystemExit(main())
